"""The fused ops, one module each: ``nt_xent`` (ops/nt_xent.py), ``pgd_step``/``pgd_init`` (ops/pgd.py)."""

from cbd_fast.ops.nt_xent import nt_xent
from cbd_fast.ops.pgd import pgd_init, pgd_step

__all__ = ["nt_xent", "pgd_step", "pgd_init"]
