"""The library never imports the UI stack; pages never import torch."""
import os
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


def test_quieting_the_dependencies_imports_none_of_them_and_still_quiets_them():
    """Every command starts with `quiet_dependency_warnings`: it costs no import of
    scikit-learn or transformers, and their notices are still hidden once they load, and when
    it is called again after transformers is in memory (the dashboard's later runs)."""
    code = ("import sys, warnings\n"
            "from modhifi.backend import quiet_dependency_warnings\n"
            "quiet_dependency_warnings()\n"
            "print(sorted(m for m in ('sklearn', 'transformers') if m in sys.modules))\n"
            "import numpy as np\n"
            "from sklearn.linear_model import LogisticRegression\n"
            "from transformers.utils import logging\n"
            "x, y = np.random.default_rng(0).normal(size=(40, 3)), np.arange(40) % 2\n"
            "def notices(filters):\n"
            "    with warnings.catch_warnings(record=True) as seen:\n"
            "        if not filters:\n"
            "            warnings.resetwarnings()\n"
            "        LogisticRegression(max_iter=1).fit(x, y)\n"
            "    return len(seen)\n"
            "def quieted():\n"
            "    return (logging.get_verbosity() == logging.ERROR,\n"
            "            logging.is_progress_bar_enabled())\n"
            "print(notices(False), notices(True), *quieted())\n"
            "logging.set_verbosity_info(); logging.enable_progress_bar()\n"
            "quiet_dependency_warnings()\n"
            "print(*quieted())\n")
    quiet = {name: value for name, value in os.environ.items()
             if name not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env=quiet).stdout.splitlines()
    unquieted, rest = out[1].split(" ", 1)
    assert out[0] == "[]" and int(unquieted) > 0 and rest == "0 True False"  # the probe warns
    assert out[2] == "True False"


def test_pages_do_no_tensor_math():
    for path in [ROOT / "app.py", *(ROOT / "pages").glob("*.py")]:
        assert not re.search(r"^\s*(import|from)\s+torch", path.read_text(), re.M), path


def test_options_are_defined_once_and_the_cli_help_needs_no_torch():
    """Every choice comes from modhifi.options; listing them does not load torch."""
    code = ("import sys, modhifi.options, modhifi.__main__\n"
            "modhifi.__main__.build_parser()\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert out.strip() == "False"
    sources = [p.read_text() for p in [*(ROOT / "modhifi").glob("*.py"), *(ROOT / "pages").glob("*.py"),
                                       *(ROOT / "ui").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
               if p.name != "options.py"]
    for spelled in ('("auto", "cpu", "cuda")', '("uniform", "global")', '("channels", "macs")',
                    '("zero", "negate")', '("rescale", "refit", "none")', '("all", "internal")'):
        assert not any(spelled in source for source in sources), spelled


def test_the_prune_page_offers_every_method_with_the_library_labels():
    from modhifi.options import METHOD_LABELS, Method, choices

    page = (ROOT / "pages" / "prune.py").read_text()
    assert "choices(Method), format_func=METHOD_LABELS.get" in page  # no list of its own
    assert tuple(METHOD_LABELS) == choices(Method)


def test_the_front_door_exports_the_public_api():
    import modhifi

    for name in modhifi.__all__:
        assert getattr(modhifi, name) is not None, name
    from modhifi.prune import analyse

    assert modhifi.analyse is analyse
