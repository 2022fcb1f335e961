"""``import cbd_fast`` is lean: no Triton import, no extension load, no CUDA initialisation, and the
package works without the extension and without Triton (each case in a fresh interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def _run(code: str, **env: str) -> str:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CBD_FAST_BACKEND")}
    full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"subprocess failed (rc {proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def test_import_loads_nothing_heavy() -> None:
    out = _run(
        """
        import sys
        import cbd_fast
        import torch
        heavy = [m for m in ("triton", "cbd_fast._C") if m in sys.modules]
        assert not heavy, f"import cbd_fast imported {heavy}"
        assert not torch.cuda.is_initialized(), "import cbd_fast initialised CUDA"
        cbd_fast.available_backends("cpu")  # loads the extension (if built) but still no CUDA/triton
        assert "triton" not in sys.modules, "available_backends imported triton"
        assert not torch.cuda.is_initialized(), "available_backends initialised CUDA"
        print("ok", cbd_fast.__version__)
        """
    )
    assert out.startswith("ok ")


def test_public_names_resolve_lazily() -> None:
    _run(
        """
        import sys
        import cbd_fast
        heavy = ("cbd_fast.kernels.triton", "cbd_fast.app.cli", "cbd_fast.app.demo")
        lazy = [m for m in heavy if m in sys.modules]
        assert not lazy, f"import cbd_fast imported {lazy}"
        assert callable(cbd_fast.build_info)
        assert isinstance(cbd_fast.build_info(), dict)
        assert "available_backends" in dir(cbd_fast)
        try:
            cbd_fast.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("missing attribute did not raise")
        """
    )


def test_works_with_extension_disabled() -> None:
    out = _run(
        """
        import sys
        import torch
        import cbd_fast
        from cbd_fast.ops import _ext
        assert cbd_fast.available_backends("cpu") == ["torch"], cbd_fast.available_backends("cpu")
        assert "cbd_fast._C" not in sys.modules
        assert "CBD_FAST_DISABLE_EXT" in _ext.load_error()
        a, b = torch.randn(4, 8), torch.randn(4, 8)
        loss = cbd_fast.ops.nt_xent(a, b, 0.5)

        from cbd_fast.ops.reference import nt_xent_reference
        torch.testing.assert_close(loss, nt_xent_reference(a, b, 0.5))
        print("ok")
        """,
        CBD_FAST_DISABLE_EXT="1",
    )
    assert out.strip() == "ok"


def test_works_without_triton() -> None:
    out = _run(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` fail as if it were not installed
        import torch
        import cbd_fast
        from cbd_fast.ops.backends import backend_status
        assert "not installed" in backend_status("cpu")["triton"], backend_status("cpu")
        assert "triton" not in cbd_fast.available_backends("cpu")
        a, b = torch.randn(4, 8), torch.randn(4, 8)
        cbd_fast.ops.nt_xent(a, b, 0.5)
        print("ok")
        """,
        TRITON_INTERPRET="1",
    )
    assert out.strip() == "ok"


@pytest.mark.parametrize(
    "module", ["cbd_fast.info", "cbd_fast.app.info", "cbd_fast.ops.backends", "cbd_fast.ops.build_info"]
)
def test_support_modules_do_not_import_triton(module: str) -> None:
    _run(
        f"""
        import sys, importlib
        importlib.import_module({module!r})
        assert "triton" not in sys.modules
        """
    )
