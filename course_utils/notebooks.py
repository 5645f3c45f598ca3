"""Re-execute the course notebooks in place, so their committed outputs come from one profile."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .profiles import ENV_VAR, _repo_root


def notebook_paths(names=()) -> list[Path]:
    root = _repo_root(Path.cwd().resolve())
    if root is None:
        raise FileNotFoundError("run this inside the course checkout (no pyproject.toml + course_utils/ found)")
    # chapters, then the solution notebooks (exercise stubs stay unexecuted: a learner starts from a clean page)
    all_nbs = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")) + sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return all_nbs
    picked = []
    for name in names:
        p = Path(name)
        matches = [p.resolve()] if p.suffix == ".ipynb" and p.exists() else [nb for nb in all_nbs if nb.name.startswith(name)]
        if not matches:
            raise FileNotFoundError(f"no notebook matches {name!r}; have {[nb.name for nb in all_nbs]}")
        picked += matches
    return picked


REPO = "<repo>"  # what the checkout's own path becomes in saved outputs


def scrub_paths(nb, root: Path) -> int:
    """Replace the checkout's absolute path in every text output of ``nb`` by ``<repo>``, so committed outputs do not
    carry the path of the machine that ran them. Returns the number of replacements."""
    prefix, count = str(root), 0

    def clean(text):
        nonlocal count
        if isinstance(text, list):
            return [clean(t) for t in text]
        count += text.count(prefix)
        return text.replace(prefix, REPO)

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = clean(out["text"])
            for mime in ("text/plain", "text/markdown", "text/html"):
                if mime in out.get("data", {}):
                    out["data"][mime] = clean(out["data"][mime])
            if "traceback" in out:
                out["traceback"] = clean(out["traceback"])
    return count


def execute_notebooks(names=(), profile: str = "tiny", timeout: int = 1800) -> int:
    """Run each notebook top to bottom in a fresh kernel with ``LLM_COURSE_PROFILE=profile``; save outputs."""
    import nbformat
    from nbclient import NotebookClient

    os.environ[ENV_VAR] = profile
    for path in notebook_paths(names):
        t = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
        scrub_paths(nb, _repo_root(path.parent) or path.parent)
        nbformat.write(nb, path)
        print(f"{path.name}: executed with profile {profile!r} in {time.perf_counter() - t:.0f} s")
    return 0
