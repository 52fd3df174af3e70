#!/usr/bin/env python3
"""The PyTorch baseline for `impasto bench`: Gatys et al.'s optimisation written the way the PyTorch
reference tools write it (an nn.Sequential VGG run layer by layer to conv5_1, Gram matrices of the
style layers, content at conv4_2, torch.optim.LBFGS over the image), timed on the same machine, with
the same weight file and sizes, so "impasto is N× faster" can be checked anywhere torch is installed.

    python3 benches/pytorch_reference.py --model vgg16_hed.safetensors --sizes 256 --iterations 8

Prints one JSON row per size: seconds per L-BFGS iteration (one forward and backward pass of the
loss, as torch.optim.LBFGS evaluates it) averaged over --iterations after --warmup, the torch
version and the thread count. The images are random (the time does not depend on what they show);
the weights are read from the .safetensors file without the safetensors package.

Needs Python torch: the full `pip install torch==2.11.0` (the project's minimal libtorch install leaves
out CUDA libraries that `import torch` loads), e.g. in a virtual environment of its own.
"""

import argparse
import json
import struct
import time

import torch
import torch.nn.functional as F

# torchvision's VGG-16 feature indices of the convolutions, and where the pools fall
VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
POOL_AFTER = {2, 7, 14, 21}  # index of the conv whose block ends with a pool (before conv3_1 … conv5_1)
STYLE = {0: "conv1_1", 5: "conv2_1", 10: "conv3_1", 17: "conv4_1", 24: "conv5_1"}
CONTENT = {19: "conv4_2"}
DEEPEST = 24  # conv5_1
CAFFE_MEAN_BGR = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)


def read_safetensors(path):
    """The tensors of a .safetensors file (float32 only), read by hand."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = bytearray(f.read())
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", f"{name}: {info['dtype']}"
        start, end = info["data_offsets"]
        tensors[name] = torch.frombuffer(data[start:end], dtype=torch.float32).reshape(info["shape"]).clone()
    return tensors


def build_features(weights):
    """conv1_1 … conv5_1 as the reference tools build it: Conv2d, ReLU and MaxPool2d modules."""
    layers = []
    for index in VGG16_CONVS:
        if index > DEEPEST:
            break
        w, b = weights[f"features.{index}.weight"], weights[f"features.{index}.bias"]
        conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1)
        conv.weight.data.copy_(w)
        conv.bias.data.copy_(b)
        layers.append((index, conv))
        layers.append((None, torch.nn.ReLU(inplace=False)))
        if index in POOL_AFTER:
            layers.append((None, torch.nn.MaxPool2d(2, 2)))
    for _, module in layers:
        for p in module.parameters():
            p.requires_grad_(False)
    return layers


def features(layers, rgb01):
    """Activations (after ReLU) of the style and content layers for an RGB image in 0..1."""
    x = rgb01.flip(1) * 255.0 - CAFFE_MEAN_BGR
    out, pending = {}, None
    for index, module in layers:
        x = module(x)
        if pending is not None:
            out[pending] = x
            pending = None
        if index in STYLE or index in CONTENT:
            pending = index  # the ReLU that follows
    return out


def gram(a):
    _, c, h, w = a.shape
    f = a.reshape(c, h * w)
    return f @ f.t() / (h * w)


def time_size(layers, height, width, iterations, warmup):
    torch.manual_seed(0)
    content = torch.rand(1, 3, height, width)
    style = torch.rand(1, 3, height, width)
    with torch.no_grad():
        content_feats = features(layers, content)
        style_grams = {i: gram(a) for i, a in features(layers, style).items() if i in STYLE}
    target = content_feats[19]
    image = content.clone().requires_grad_(True)
    evaluations = [0]

    def closure():
        optimizer.zero_grad()
        feats = features(layers, image)
        content_loss = (feats[19] - target).pow(2).sum() / target.pow(2).sum()
        style_loss = sum((gram(feats[i]) - g).pow(2).sum() / g.pow(2).sum() for i, g in style_grams.items()) / 5
        loss = 1e3 * (0.8 * content_loss + style_loss)
        loss.backward()
        evaluations[0] += 1
        return loss

    optimizer = torch.optim.LBFGS([image], max_iter=1, history_size=100)
    for _ in range(warmup):
        optimizer.step(closure)
    evaluations[0] = 0
    started = time.perf_counter()
    for _ in range(iterations):
        optimizer.step(closure)
    seconds = time.perf_counter() - started
    return {
        "tool": "pytorch-reference",
        "width": width,
        "height": height,
        "seconds_per_iteration": seconds / max(evaluations[0], 1),
        "evaluations": evaluations[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def parse_size(text):
    if "x" in text:
        w, h = text.split("x")
        return int(h), int(w)
    return int(text), int(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="VGG-16 .safetensors (torchvision names, Caffe input)")
    parser.add_argument("--sizes", default="256", help="comma-separated N or WxH")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = build_features(read_safetensors(args.model))
    for size in args.sizes.split(","):
        height, width = parse_size(size)
        print(json.dumps(time_size(layers, height, width, args.iterations, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
