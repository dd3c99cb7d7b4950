"""The library never imports the UI stack; pages never import torch."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_library_imports_no_ui_packages():
    modules = sorted(p.stem for p in (ROOT / "modhifi").glob("*.py") if p.stem != "__main__")
    code = ("import sys\n" + "".join(f"import modhifi.{m}\n" for m in modules) +
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('streamlit', 'plotly')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_pages_do_no_tensor_math():
    for path in [ROOT / "app.py", *(ROOT / "pages").glob("*.py")]:
        assert not re.search(r"^\s*(import|from)\s+torch", path.read_text(), re.M), path
