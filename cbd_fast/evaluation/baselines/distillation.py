"""Neural Attention Distillation (NAD): Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention Distillation:
Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021 (code: github.com/bboylyg/NAD).

The paper's defense, with the defender's small clean labeled set (5% of the training data):

1. Teacher: fine-tune a copy of the backdoored model on the clean set (the authors' README: all layers,
   5-10 epochs; here ``teacher_epochs=10`` with the student's optimiser and schedule and beta = 0, which
   is how the README says to obtain it).
2. Student: the backdoored model itself, trained with
   ``CE(student(x), y) + sum_l beta_l * AT(a_l^S(x), a_l^T(x))`` where for the feature map ``a`` [B, C, H, W]
   of a block ``A(a) = sum_c |a_c|^p`` (p = 2), flattened and divided by its L2 norm (+ 1e-6), and
   ``AT`` = the mean squared error between the student's and the (fixed, eval-mode) teacher's maps
   (``at.py`` of the NAD code, from Zagoruyko & Komodakis' attention transfer).
3. Optimiser (NAD ``config.py`` / ``main.py``): SGD, momentum 0.9, Nesterov, weight decay 1e-4, batch 64,
   20 epochs, lr 0.1 for the first 2 epochs and 0.01 after (``adjust_learning_rate``); betas
   (500, 1000, 1000) for the three residual groups of a WRN-16-1 (the paper's BadNets setting).

Layers, generically: the BLOCKS of ``model.backbone``: its direct children that contain submodules (a
``nn.Sequential`` / ``nn.ModuleList`` child whose children are all such blocks, e.g. a ViT's
``blocks``, is replaced by them), keeping those whose output is a 2-4-D tensor; NAD distils the last
``len(betas)`` of them (fewer if the backbone has fewer; the last betas are used). FMNISTNet: its three
conv+BN+pool stages; bn_gap_cnn / groupnorm_cnn: the last three conv stages; resnet8: the three basic
blocks; tiny_vit: the transformer blocks (token features [B, T, E]: the map is sum_e |a_e|^p over
the E channels of each token, normalised over the T tokens). A backbone without such blocks (the MLP)
falls back to the outputs of its parametrised leaf layers (Conv2d / Linear): for a [B, D] output the map
is |a|^p over the D units, normalised (documented fallback: no spatial axis exists). ``layers=[names]``
overrides the choice.

Deviations: no data augmentation (the NAD code fine-tunes with random crops and flips); the teacher's
recipe is the student's with beta = 0 rather than a separate run.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbd_fast.evaluation.baselines._common import (
    backbone_of,
    capture,
    check_data,
    check_model,
    device_of,
    float_arg,
    info_arg,
    int_arg,
    module_by_name,
    module_names,
    sgd_train,
)
from cbd_fast.evaluation.metrics import accuracy

__all__ = ["attention_map", "distillation_layers", "nad"]


def attention_map(a: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """NAD's attention map, [B, ...] -> [B, positions], each row divided by its L2 norm (+ 1e-6).

    [B, C, H, W] -> sum over C of |a|^p, [B, H*W]; [B, T, E] (tokens) -> sum over E, [B, T];
    [B, D] -> |a|^p, [B, D].
    """
    if a.dim() == 4:
        am = a.abs().pow(power).sum(1).flatten(1)
    elif a.dim() == 3:
        am = a.abs().pow(power).sum(2)
    elif a.dim() == 2:
        am = a.abs().pow(power)
    else:
        raise ValueError(f"attention maps need a 2-, 3- or 4-D activation; got shape {tuple(a.shape)}")
    return am / (am.norm(dim=1, keepdim=True) + 1e-6)


def _has_children(m: nn.Module) -> bool:
    return next(m.children(), None) is not None


def _candidate_blocks(backbone: nn.Module) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for child in backbone.children():
        kids = list(child.children())
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and kids and all(_has_children(k) for k in kids):
            blocks.extend(kids)
        elif _has_children(child):
            blocks.append(child)
    return blocks


@torch.no_grad()
def _output_dims(model: nn.Module, modules: list[nn.Module], x: torch.Tensor) -> list[int | None]:
    """The output tensor rank of each module on one forward of ``x`` (None: no tensor output / not run)."""
    named = {str(i): m for i, m in enumerate(modules)}
    was = model.training
    model.eval()
    try:
        with capture(named) as seen:
            model(x)
    finally:
        model.train(was)
    return [seen[k].dim() if isinstance(seen.get(k), torch.Tensor) else None for k in named]


def distillation_layers(model: nn.Module, count: int, probe: torch.Tensor) -> list[str]:
    """The names of the (at most) ``count`` layers NAD distils in ``model`` (module docstring's rule).

    Args:
        model: a classifier with ``.backbone``.
        count: how many (the last ones).
        probe: a few images, to see the layers' output shapes.
    """
    backbone = backbone_of(model)
    names = module_names(model)
    candidates = _candidate_blocks(backbone)
    dims = _output_dims(model, candidates, probe) if candidates else []
    chosen = [m for m, d in zip(candidates, dims) if d in (2, 3, 4)]
    if not chosen:
        leaves = [m for m in backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        dims = _output_dims(model, leaves, probe) if leaves else []
        chosen = [m for m, d in zip(leaves, dims) if d in (2, 3, 4)]
    if not chosen:
        raise ValueError(
            "nad: found no block or Conv2d/Linear layer with a 2-4-D output in the backbone; "
            "pass layers=[names]"
        )
    return [names[id(m)] for m in chosen[-count:]]


def nad(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    betas: Sequence[float] = (500.0, 1000.0, 1000.0),
    power: float = 2.0,
    epochs: int = 20,
    teacher_epochs: int = 10,
    lr: float = 0.1,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    layers: Sequence[str] | None = None,
    info: dict[str, Any] | None = None,
) -> nn.Module:
    """Neural Attention Distillation (Li et al., ICLR 2021): returns the distilled student (a new model).

    Args:
        model: a classifier with ``.backbone`` (not modified).
        images: [N, C, H, W] float clean images, labels: [N] int64 (the defender's labeled set).
        seed: seed of the shuffles (teacher, then student).
        betas: weights of the attention losses, one per distilled layer, shallow to deep (paper:
            500, 1000, 1000); each >= 0.
        power: p of the attention map (paper: 2), > 0.
        epochs: student epochs (paper: 20). teacher_epochs: fine-tuning epochs of the teacher (5-10).
        lr: initial SGD learning rate (0.1), divided by 10 after 2 epochs (both stages).
        batch_size (64), momentum (0.9, Nesterov), weight_decay (1e-4): the optimiser.
        layers: optional module names (as in ``model.named_modules()``) to distil, as many as betas.
        info: optional dict, filled with ``layers`` (names), ``betas`` (used) and ``teacher_train_acc``
            (teacher accuracy on the defender's set).

    Returns:
        The student, in eval mode.
    """
    check_model(model)
    check_data(images, labels)
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) == 0:
        raise ValueError(f"betas must be a non-empty sequence of numbers >= 0; got {betas!r}")
    betas = [float_arg(f"betas[{i}]", b, low=0.0) for i, b in enumerate(betas)]
    power = float_arg("power", power, low=0.0, low_open=True)
    epochs = int_arg("epochs", epochs)
    teacher_epochs = int_arg("teacher_epochs", teacher_epochs)
    lr = float_arg("lr", lr, low=0.0, low_open=True)
    batch_size = int_arg("batch_size", batch_size)
    momentum = float_arg("momentum", momentum, low=0.0, high=1.0, high_open=True)
    weight_decay = float_arg("weight_decay", weight_decay, low=0.0)
    seed = int_arg("seed", seed, low=0)
    out = info_arg(info)

    student = copy.deepcopy(model).eval()
    if layers is not None:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) == 0:
            raise ValueError(f"layers must be a non-empty sequence of module names or None; got {layers!r}")
        if len(layers) != len(betas):
            raise ValueError(
                f"layers and betas must have the same length; got {len(layers)} and {len(betas)}"
            )
        names = list(layers)
        for n in names:
            module_by_name(student, n, "layers")
    else:
        names = distillation_layers(student, len(betas), images[:2].to(device_of(student)))
        betas = betas[len(betas) - len(names) :]

    g = torch.Generator().manual_seed(seed)
    optim = dict(
        lr=lr,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        generator=g,
        schedule="step2",
        nesterov=True,
    )
    teacher = copy.deepcopy(model)
    sgd_train(teacher, images, labels, epochs=teacher_epochs, what="nad teacher fine-tuning", **optim)
    teacher.requires_grad_(False).eval()

    s_modules = {n: module_by_name(student, n, "layers") for n in names}
    t_modules = {n: module_by_name(teacher, n, "layers") for n in names}
    with capture(s_modules) as s_act, capture(t_modules) as t_act:

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = F.cross_entropy(student(x), y)
            with torch.no_grad():
                teacher(x)
            for n, beta in zip(names, betas):
                if beta > 0:
                    a_s, a_t = s_act[n], t_act[n]
                    loss = loss + beta * F.mse_loss(attention_map(a_s, power), attention_map(a_t, power))
            return loss

        sgd_train(student, images, labels, epochs=epochs, loss_fn=loss_fn, what="nad distillation", **optim)

    out.update(layers=names, betas=betas, teacher_train_acc=accuracy(teacher, images, labels))
    return student.eval()
