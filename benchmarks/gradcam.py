"""Grad-CAM / Grad-CAM++: vitlens vs pytorch-grad-cam on the same model and batch, same run.

    python benchmarks/gradcam.py [--model resnet50|efficientnet_lite0|vit_tiny] [--batch 16] [--repeats 5]

Both compute the map of the predicted class for every image of the batch (one forward, one
backward). Target (issue #5): vitlens no slower than pytorch-grad-cam.
"""

from __future__ import annotations

import argparse
import functools

import torch

import vitlens
from _timing import timed


def build(name: str):
    if name == "resnet50":
        import torchvision

        module = torchvision.models.resnet50(weights=None).eval()
        return module, module.layer4[-1], "layer4.2", None, 224
    if name == "efficientnet_lite0":
        model = vitlens.load_model("vitlens:efficientnet_lite0")
        return model.module, model.module.bn2, "bn2", None, 224
    if name == "vit_tiny":
        import timm
        from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform

        module = timm.create_model("vit_tiny_patch16_224").eval()
        return module, module.blocks[-1].norm1, "blocks.11.norm1", functools.partial(vit_reshape_transform), 224
    raise SystemExit(f"unknown model {name}")




def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    module, layer, layer_name, reshape, size = build(args.model)
    x = torch.randn(args.batch, 3, size, size)
    with torch.no_grad():
        predicted = module(x).argmax(-1).tolist()
    model = vitlens.load_model(module)
    print(f"model {args.model}, batch {args.batch}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for ours, theirs_cls in (("gradcam", pgc.GradCAM), ("gradcam++", pgc.GradCAMPlusPlus)):
        cam = theirs_cls(model=module, target_layers=[layer], reshape_transform=reshape)
        targets = [ClassifierOutputTarget(t) for t in predicted]
        # partial binds this iteration's cam / targets / ours now (no late-binding closures over loop variables)
        t_theirs = timed(functools.partial(cam, input_tensor=x, targets=targets), args.repeats)
        cam.activations_and_grads.release()
        t_ours = timed(functools.partial(vitlens.explain, model, x, methods=[ours], target=predicted,
                                         batch_size=args.batch, params={ours: {"layers": [layer_name]}}),
                       args.repeats)
        print(f"{ours:10s} pytorch-grad-cam {t_theirs * 1000:8.1f} ms   vitlens {t_ours * 1000:8.1f} ms   "
              f"vitlens/pytorch-grad-cam = {t_ours / t_theirs:.2f}x   (target <= 1.0x)")
    t_both = timed(lambda: vitlens.explain(model, x, methods=["gradcam", "gradcam++", "xgradcam", "layercam"],
                                           target=predicted, batch_size=args.batch,
                                           params={m: {"layers": [layer_name]} for m in
                                                   ("gradcam", "gradcam++", "xgradcam", "layercam")}), args.repeats)
    print(f"vitlens, all four CAM methods from one pass: {t_both * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
