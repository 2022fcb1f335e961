"""The frozen original's clean features, computed once per sample instead of once per batch.

The anchor clean term (and ``attack_anchors="original"``, ``pull_target="original"``) reads
``f_0(x)``, the frozen original encoder's features of the clean images, on every batch. Without
augmentation an image is the same tensor every epoch and ``f_0`` never changes, so the loop computes
the table ``f_0(x_i)`` for every training index ``i`` once, before the first epoch, and looks rows up
by sample index afterwards: one no-grad forward per image for the whole run instead of one per image
per epoch.

The table is computed in index order in chunks of the local batch size, sharded over ranks (rank r
computes every ``world``-th index and the rows are all-gathered), so every rank holds the same table
and a resumed run rebuilds exactly the table an uninterrupted run used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cbd_fast.core import distributed as dist

__all__ = ["ReferenceCache", "cache_policy", "build_reference_cache"]

#: the largest table kept on the CPU (bytes)
_CPU_LIMIT = 2 << 30


class ReferenceCache:
    """``f_0`` features per sample index.

    Attributes:
        table: [N, D] float32 features on the run's device (rows of indices never cached are 0).
        known: [N] bool, which rows hold features.
    """

    def __init__(self, table: torch.Tensor, known: torch.Tensor) -> None:
        self.table, self.known = table, known

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """[B] int64 sample indices on the device -> [B, D] float32 features (a new tensor).

        Raises:
            KeyError: on the CPU (where the check costs no device sync), an index outside the table
                or one that was never cached (the loop only asks for training indices).
        """
        if self.table.device.type == "cpu" and indices.numel():
            n = self.table.shape[0]
            if int(indices.min()) < 0 or int(indices.max()) >= n:
                raise KeyError(f"sample index outside the reference cache of {n} rows")
            if not bool(self.known[indices].all()):
                raise KeyError("a sample index without cached reference features")
        return self.table.index_select(0, indices)


def cache_policy(config: Any, data: Any, n_rows: int | None, dim: int, device: torch.device) -> bool:
    """Whether the run keeps a reference cache (``config.reference_cache``).

    Args:
        config: the run's PurifyConfig.
        data: the user's data (Tensor, Dataset or DataLoader).
        n_rows: the number of sample indices (None: unknown).
        dim: the feature dimension D.
        device: the run's device.

    Raises:
        ValueError: ``reference_cache=True`` where a cache would be wrong (a DataLoader, whose batches
            carry no stable sample index, or ``augmentation``, which changes the images each epoch).
    """
    setting = config.reference_cache
    if setting is False:
        return False
    loader = isinstance(data, torch.utils.data.DataLoader)
    if setting is True:
        if loader or n_rows is None:
            raise ValueError(
                "reference_cache=True needs a Tensor or Dataset input (a DataLoader's images carry no "
                "stable sample index); pass the dataset itself or set reference_cache='auto'"
            )
        if config.augmentation != "none":
            raise ValueError(
                f"reference_cache=True needs augmentation='none' (got {config.augmentation!r}): "
                "augmented images change every epoch"
            )
        return True
    if loader or n_rows is None or config.augmentation != "none":
        return False
    size = n_rows * dim * 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return size <= free // 4
    return size <= _CPU_LIMIT


@torch.no_grad()
def build_reference_cache(
    reference: torch.nn.Module,
    images_of: Any,
    indices: Sequence[int],
    n_rows: int,
    batch_size: int,
    device: torch.device,
    ctx: dist.DistContext,
    autocast: Any,
) -> ReferenceCache:
    """Compute ``f_0`` for ``indices`` (this rank's share, then all-gathered).

    Args:
        reference: the frozen original as an encoder (eval mode, no gradient).
        images_of: ``images_of(list_of_indices) -> [k, C, H, W]`` float images in [0, 1] on ``device``.
        indices: the sample indices to cache (the training indices).
        n_rows: the table's size (one more than the largest index).
        batch_size: images per forward (the local batch size: memory the run already needs).
        device: the run's device.
        ctx: the distributed context.
        autocast: the run's autocast context factory (``RunContext.autocast``).

    Returns:
        a :class:`ReferenceCache` with the same table on every rank.
    """
    order = sorted(int(i) for i in indices)
    world = ctx.world_size if ctx.enabled else 1
    rank = ctx.rank if ctx.enabled else 0
    mine = order[rank::world]
    table: torch.Tensor | None = None
    known = torch.zeros(n_rows, dtype=torch.bool, device=device)
    if world == 1:  # one process: each chunk's features go straight into the table
        for s in range(0, len(mine), batch_size):
            ids = mine[s : s + batch_size]
            with autocast():
                z = reference(images_of(ids)).float()
            if table is None:
                table = torch.zeros((n_rows, z.shape[1]), dtype=torch.float32, device=device)
            where = torch.tensor(ids, dtype=torch.int64, device=device)
            table[where] = z
            known[where] = True
        assert table is not None, "no index to cache"
        return ReferenceCache(table, known)
    feats: list[torch.Tensor] = []
    for s in range(0, len(mine), batch_size):
        with autocast():
            feats.append(reference(images_of(mine[s : s + batch_size])).float())
    if feats:
        local = torch.cat(feats)
    else:  # a rank with nothing to compute still joins the gathers with an empty [0, D]
        with autocast():
            local = reference(images_of(order[:1])).float()[:0]
    del feats
    layout = dist.row_layout(local.shape[0], ctx, device)
    rows = layout.gather(local, ctx, "none")
    # the gathered rows are rank-major: rank r's are order[r::world]
    where = torch.tensor([i for r in range(world) for i in order[r::world]], dtype=torch.int64, device=device)
    table = torch.zeros((n_rows, rows.shape[1]), dtype=torch.float32, device=device)
    table[where] = rows
    known[where] = True
    return ReferenceCache(table, known)
