"""The explorer's one temporary folder: everything the app and Gradio write (uploads, pictures sent to pages,
downloads) goes there, and it is removed when the explorer stops."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def temporary_workspace(temp_root=None):
    """A new temporary folder (in `temp_root`, default the system's), removed on exit, with `GRADIO_TEMP_DIR` set to
    its `gradio/` sub-folder meanwhile (restored on exit).

    Gradio reads `GRADIO_TEMP_DIR` when components are built, while it serves, and partly when it is first imported:
    enter this before importing gradio, as `command.serve` does."""
    workspace = Path(tempfile.mkdtemp(prefix="hf_hierseg_explorer_", dir=temp_root))
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(workspace / "gradio")
    try:
        yield workspace
    finally:
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous
        shutil.rmtree(workspace, ignore_errors=True)


__all__ = ["temporary_workspace"]
