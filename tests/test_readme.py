"""The python snippets of README.md's "With the rest of PyTorch" section run as they are, each as a script in a
fresh process (where a user would paste them), in a scratch directory."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## With the rest of PyTorch"
# torch.compile's default backend (inductor) spends minutes generating C++ for a ResNet on a 2-core CPU; the
# snippet runs with the aot_eager backend instead, which captures the same graph (fullgraph=True still forbids
# any break) and runs it without code generation.
AOT_EAGER = "import functools, torch\ntorch.compile = functools.partial(torch.compile, backend='aot_eager')\n"


def snippets() -> dict[str, str]:
    """{subsection title: its python block}."""
    text = (ROOT / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    found = {}
    for part in section.split("\n### ")[1:]:
        title = part.splitlines()[0].strip()
        blocks = re.findall(r"```python\n(.*?)```", part, flags=re.DOTALL)
        assert len(blocks) == 1, f"README subsection {title!r}: expected one python snippet, found {len(blocks)}"
        found[title] = blocks[0]
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_integration_has_a_snippet():
    assert list(snippets()) == [
        "torch.compile", "Mixed precision: autocast and GradScaler",
        "DistributedDataParallel and synchronized BatchNorm", "timm", "Detection backbones and FrozenBatchNorm2d",
        "Feature extraction (FX)", "torch.export", "Checkpoints",
    ]


# In a fresh process the first fused op of the compile snippet runs inside torch.compile's trace: it must find
# everything it needs built (fused_resnet builds its kernel sets at import), or fullgraph=True fails.
@pytest.mark.parametrize("title", list(snippets()))
def test_readme_snippet_runs(title, tmp_path):
    code = snippets()[title]
    if "torch.compile(" in code:
        code = AOT_EAGER + code
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"README snippet {title!r} failed:\n{result.stderr[-3000:]}"
