"""Draw the figures of the gallery page (docs/gallery.rst) from a tiny model.

A small SE-CNN and a plain CNN are trained for a few seconds on the CPU on a
synthetic four-class image set (stripes, blobs, checkerboards), so the script needs
no download and no GPU. Every figure is made with the public API only:
``attnblocks.inspect`` records, ``attnblocks.plot`` draws.

Run from the repository root::

    python docs/make_gallery.py            # writes docs/_static/gallery/*.png
    python docs/make_gallery.py --out /tmp/plotcheck
"""

from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from attnblocks import SEBlock, insert_attention
from attnblocks.inspect import (
    gate_statistics,
    grad_cam,
    record_features,
    record_gates,
    record_maps,
)
from attnblocks.plot import (
    channel_heatmaps,
    confusion_matrix,
    feature_map_grid,
    gate_class_profile,
    gate_heatmap,
    gate_profiles,
    gradcam_overlay,
    spatial_map_overlay,
    training_curves,
)

CLASSES = ["h-stripes", "v-stripes", "blob", "checker"]
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def make_images(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` normalised 32x32 RGB images of the four synthetic classes, and their labels."""
    labels = torch.randint(0, 4, (n,), generator=gen)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    images = torch.empty(n, 3, 32, 32)
    for i, label in enumerate(labels.tolist()):
        freq = 0.4 + 0.5 * torch.rand(1, generator=gen).item()
        phase = 2 * math.pi * torch.rand(1, generator=gen).item()
        if label == 0:
            pattern = 0.5 + 0.5 * torch.sin(freq * yy + phase)
        elif label == 1:
            pattern = 0.5 + 0.5 * torch.sin(freq * xx + phase)
        elif label == 2:
            cy, cx = (6 + 20 * torch.rand(2, generator=gen)).tolist()
            pattern = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)
        else:
            size = int(3 + 4 * torch.rand(1, generator=gen).item())
            pattern = (((yy // size) + (xx // size)) % 2).float()
        tint = 0.2 + 0.5 * torch.rand(3, 1, 1, generator=gen)
        background = 0.1 + 0.3 * torch.rand(3, 1, 1, generator=gen)
        grain = 0.2 * torch.randn(1, 32, 32, generator=gen)
        noise = grain + 0.05 * torch.randn(3, 32, 32, generator=gen)
        images[i] = (background + tint * pattern + noise).clamp(0, 1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std, labels


def make_net(se: bool) -> nn.Sequential:
    """A three-stage CNN, with an SE block closing each stage when ``se``."""

    def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        layers = OrderedDict(
            conv=nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(inplace=True),
        )
        if se:
            layers["se"] = SEBlock(cout, reduction=4)
        return nn.Sequential(layers)

    return nn.Sequential(
        OrderedDict(
            layer1=stage(3, 16, 1),
            layer2=stage(16, 32, 2),
            layer3=stage(32, 64, 2),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(64, len(CLASSES)),
        )
    )


def train(net: nn.Module, data, test, epochs: int) -> dict[str, list[float]]:
    """Train with Adam; return a history for attnblocks.plot.training_curves."""
    history: dict[str, list[float]] = {
        "iter_loss": [],
        "train_loss": [],
        "test_loss": [],
        "train_acc": [],
        "test_acc": [],
    }
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        net.train()
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in data:
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history["iter_loss"].append(loss.item())
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        history["train_loss"].append(loss_sum / total)
        history["train_acc"].append(correct / total)
        net.eval()
        with torch.no_grad():
            x, y = test
            logits = net(x)
            history["test_loss"].append(F.cross_entropy(logits, y).item())
            history["test_acc"].append(float((logits.argmax(1) == y).float().mean()))
    return history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "_static" / "gallery")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--dpi", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = make_images(1024, gen)
    data = list(zip(x_train.split(64), y_train.split(64), strict=True))
    test = make_images(512, gen)

    plain, se_net = make_net(se=False), make_net(se=True)
    histories = {
        "CNN": train(plain, data, test, args.epochs),
        "SE-CNN": train(se_net, data, test, args.epochs),
    }

    def save(fig, name: str) -> None:
        fig.savefig(args.out / f"{name}.png", dpi=args.dpi)
        print(f"wrote {args.out / name}.png")

    save(
        training_curves(histories, smooth=10, title="Synthetic shapes, 4 classes"),
        "training_curves",
    )

    x_test, y_test = test
    se_net.eval()
    with torch.no_grad():
        predictions = se_net(x_test).argmax(1)
    save(confusion_matrix(y_test, predictions, class_names=CLASSES), "confusion_matrix")

    stats = gate_statistics(se_net, list(zip(x_test.split(128), y_test.split(128), strict=True)))
    save(gate_profiles(stats, class_names=CLASSES), "gate_profiles")
    save(gate_class_profile(stats, 2, class_name=CLASSES[2]), "gate_class_profile")
    save(gate_heatmap(stats, value="specificity", log=True), "gate_heatmap")

    index = int((y_test == 2).nonzero()[0])  # a blob image
    sample = x_test[index : index + 1]
    with (
        torch.no_grad(),
        record_features(se_net, ["layer1.relu", "layer2.relu", "layer3.relu"]) as rec,
    ):
        se_net(sample)
    save(
        feature_map_grid(sample[0], rec.features, channels=6, mean=MEAN, std=STD),
        "feature_map_grid",
    )

    with (
        torch.no_grad(),
        record_features(se_net, ["layer2.relu"]) as feats,
        record_gates(se_net) as gates,
    ):
        se_net(sample)
    save(
        channel_heatmaps(
            sample[0],
            feats.features["layer2.relu"],
            k=5,
            rank_by="gate",
            gate=gates.gates["layer2.se"],
            layer="layer2",
            mean=MEAN,
            std=STD,
        ),
        "channel_heatmaps",
    )

    picks = torch.cat([(y_test == c).nonzero()[:1, 0] for c in range(4)])
    images, targets = x_test[picks], y_test[picks]
    cams = {
        "CNN": grad_cam(plain, images, targets, "layer2"),
        "SE-CNN": grad_cam(se_net, images, targets, "layer2"),
    }
    titles = [CLASSES[t] for t in targets.tolist()]
    save(
        gradcam_overlay(images, cams, titles=titles, normalize="image", mean=MEAN, std=STD),
        "gradcam_overlay",
    )

    # a CBAM-CNN: the plain CNN with CBAM inserted after every stage's batch norm
    torch.manual_seed(args.seed)
    cbam_net = insert_attention(make_net(se=False), ["layer*.bn"], block="cbam", reduction=4)
    train(cbam_net, data, test, args.epochs)
    cbam_net.eval()
    with torch.no_grad(), record_maps(cbam_net) as rec:
        cbam_net(images)
    save(
        spatial_map_overlay(images, rec.maps, titles=titles, mean=MEAN, std=STD),
        "spatial_map_overlay",
    )


if __name__ == "__main__":
    main()
