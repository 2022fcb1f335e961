"""The fused ops, one module each: ``nt_xent`` (ops/nt_xent.py), ``pgd_step``/``pgd_init`` (ops/pgd.py)."""

from cbd_fast.ops.nt_xent import nt_xent, nt_xent_value_and_grad
from cbd_fast.ops.pgd import pgd_init, pgd_step

__all__ = ["nt_xent", "nt_xent_value_and_grad", "pgd_step", "pgd_init"]
