"""LeGrad (Bousselham et al., ICCV 2025, arXiv 2404.03214), adapted to classification ViTs.

For every layer l in the chosen set S, the target score is read out of that layer's output with the
model's own final norm and head, s^l = head(norm(pool(z^l)))_c, and differentiated with respect to
that layer's own attention only:

    G^l = d s^l / d A^l
    E^l = mean over heads and all N query rows of max(G^l, 0), patch key columns only   (P,)
    map = mean_{l in S} E^l

The engine computes each G^l with one partial backward that traverses one block and the head (a
plain backward of sum_l s^l would mix layers and is not equivalent). ``pool='model'`` reads the
score the way the model pools (the true logit at the last layer); ``pool='mean'`` averages all
tokens first, as the official CLIP code does. ``layers`` is ``'all'``, an int k (last k layers),
or a list of layer indices.
"""

from __future__ import annotations

import torch

from vitlens.errors import MethodError
from vitlens.methods.common import Captured, patches_to_grid


def resolve_layers(layers, num_layers: int) -> list[int]:
    """Normalise the ``layers`` parameter into sorted non-negative layer indices.

    A selection the model cannot satisfy (more layers than it has, an index beyond its depth) is a
    one-line MethodError: the parameter comes from the user.
    """
    if layers in (None, "all"):
        return list(range(num_layers))
    count = None
    if isinstance(layers, int) and not isinstance(layers, bool):
        count = layers
    elif isinstance(layers, str) and layers.strip().startswith("last"):
        digits = layers.strip()[4:].strip(" -_:")
        if not digits.isdigit():
            raise MethodError(f"layers={layers!r}: write lastN with a number, e.g. last4")
        count = int(digits)
    if count is not None:
        if not 1 <= count <= num_layers:
            shown = layers if isinstance(layers, int) else repr(layers)
            raise MethodError(f"layers={shown} asks for the last {count} layers, but the model has {num_layers}")
        return list(range(num_layers - count, num_layers))
    if isinstance(layers, str):
        text = layers.strip()
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise MethodError(f"layers={layers!r}: expected 'all', 'lastN', or layer indices such as '3,5'") from None
    else:
        values = list(layers)
    # negative indices count from the end; one below -num_layers must not wrap around to a valid layer
    out = sorted({int(v) + num_layers if int(v) < 0 else int(v) for v in values})
    if not out or out[0] < 0 or out[-1] >= num_layers:
        raise MethodError(f"layers={layers}: the model has {num_layers} layers (0 to {num_layers - 1}, "
                          f"or -1 to -{num_layers} from the end)")
    return out


def legrad(captured: Captured, layers="all", pool: str = "model") -> torch.Tensor:
    """LeGrad patch map (B, h, w)."""
    chosen = resolve_layers(layers, len(captured.attentions))
    per_layer = []
    for layer in chosen:
        gradient = captured.layer_gradients[(pool, layer)]
        per_key = gradient.clamp_min(0).mean(dim=(1, 2))  # over heads and queries -> (B, N)
        per_layer.append(per_key[:, captured.num_prefix:])
    return patches_to_grid(torch.stack(per_layer).mean(dim=0), captured.grid)
