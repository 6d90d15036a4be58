"""Channels-last against NCHW, per model: forward time NHWC / NCHW at the 16 rows ``lightning_xai._layout.choose``
times and at batches the callbacks run, and what ``choose`` decides on the model; then BatchNorm folded into the
convolutions (``lightning_xai._fold``): how many pairs fold, and the folded / unfolded time of a forward and of a
forward+backward to the input at a batch, in the layout ``choose`` takes (see docs/design.md).

    taskset -c 1 python bench/layout.py --threads 1

Models: the CIFAR-sized CNN of bench/cifar.py, ResNet-, MobileNet- and LeNet-like CNNs, a patch-embedding
transformer, two tiny CNNs on 8x8 digits, and the CIFAR CNN on 64x64 images; random weights, eval mode, inputs
uniform in [0, 1]. Each time is the best of ``--repeats`` after one warm-up pass.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai import _fold, _layout


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))


def cifar_cnn() -> nn.Module:
    return nn.Sequential(_block(3, 16), _block(16, 32), _block(32, 64),
                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)))


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c, self.d = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.d(self.c(F.relu(self.b(self.a(x))))))


def resnet_like() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), _Residual(32), _Residual(32),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), _Residual(64), _Residual(64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def mobilenet_like() -> nn.Module:
    layers: List[nn.Module] = [nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU6()]
    c = 32
    for out, stride in [(64, 1), (128, 2), (128, 1), (256, 2)]:
        layers += [nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU6(),
                   nn.Conv2d(c, out, 1), nn.BatchNorm2d(out), nn.ReLU6()]
        c = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


class PatchTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 64, 4, 4)
        layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.patches(x).flatten(2).transpose(1, 2)).mean(1))


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5), nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.c2(x)), 2), 1))


def digits_cnn() -> nn.Module:  # tests/helpers.small_cnn
    return nn.Sequential(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()),
                         nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                                       nn.Linear(32, 10)))


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


MODELS: List[Tuple[str, Callable[[], nn.Module], Tuple[int, int, int], int]] = [
    ("CIFAR CNN (bench/cifar.py)", cifar_cnn, (3, 32, 32), 128),
    ("ResNet-like", resnet_like, (3, 32, 32), 64),
    ("MobileNet-like", mobilenet_like, (3, 32, 32), 64),
    ("patch-embedding transformer", PatchTransformer, (3, 32, 32), 64),
    ("LeNet on 28x28", LeNet, (1, 28, 28), 64),
    ("tiny CNN on 8x8", tiny_cnn, (1, 8, 8), 64),
    ("digits CNN on 8x8 (tests)", digits_cnn, (1, 8, 8), 64),
    ("CIFAR CNN on 64x64", cifar_cnn, (3, 64, 64), 32),
]


def best(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s); forward time NHWC / NCHW (best of {args.repeats}); "
          f"choose(): what lightning_xai._layout.choose decides ({_layout.CHECK_ROWS} rows, GAIN {_layout.GAIN})\n")
    print(f"| model | input | NHWC / NCHW, {_layout.CHECK_ROWS} rows | rows of a batch | NHWC / NCHW, batch "
          "| choose() | pairs folded | folded / not, forward | folded / not, forward+backward |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for name, make, shape, batch in MODELS:
        net = make().eval()
        _random_statistics(net)
        x = torch.rand(batch, *shape)
        ratios = []
        for rows in (_layout.CHECK_ROWS, batch):
            part = x[:rows]
            fast = _layout.channels_last(part)
            with torch.no_grad():
                ratios.append(best(lambda: net(fast), args.repeats) / best(lambda: net(part), args.repeats))
        chosen = _layout.choose(net, x)
        verdict = "channels-last" if chosen else "its own (NCHW)"
        folded = _fold.fold(net)
        cells = ["0", "–", "–"]
        if folded is not None:
            assert _fold.agrees(net, folded, x)
            inputs = _layout.channels_last(x) if chosen else x
            with torch.no_grad():
                forward = best(lambda: folded(inputs), args.repeats) / best(lambda: net(inputs), args.repeats)
            backward = (best(lambda: input_gradient(folded, inputs), args.repeats)
                        / best(lambda: input_gradient(net, inputs), args.repeats))
            cells = [str(len(folded.pairs)), f"{forward:.2f}", f"{backward:.2f}"]
        print(f"| {name} | {'x'.join(map(str, shape))} | {ratios[0]:.2f} | {batch} | {ratios[1]:.2f} | {verdict} | "
              + " | ".join(cells) + " |", flush=True)


def input_gradient(net: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """The gradient of the summed top logits with respect to ``x`` (a saliency pass)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        out = net(leaf)
        return torch.autograd.grad(out.max(1).values.sum(), leaf)[0]


def _random_statistics(net: nn.Module) -> None:
    """BatchNorm statistics and affine parameters of a trained network's size (folding must change something)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)


if __name__ == "__main__":
    main()
