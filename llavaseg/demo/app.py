"""The Gradio page: segment, two routes side by side, and a chat with the frozen MLLM, on one image.

    from llavaseg.demo.app import build_app, launch, serve
    serve(DemoConfig(...), port=7860)          # what ``llavaseg demo`` runs

Why it is built the way it is:

* **Offline.** The page must work on a machine with no internet (and must not tell a third party who uses
  it): analytics and Gradio's version check are off (``GRADIO_ANALYTICS_ENABLED=False``, set before Gradio is
  imported, and ``analytics_enabled=False``), the theme uses the system's fonts (no Google Fonts stylesheet),
  server-side rendering (a Node process) is off, and only components whose JavaScript ships inside the
  installed ``gradio`` package are used. The browser test checks that every request stays on 127.0.0.1.
* **Never a stack trace.** Every handler reads the upload itself with :func:`~llavaseg.images.load_image` (a
  non-image, a bomb or an extreme aspect ratio is one line) instead of Gradio's decoder, and turns every
  failure into a warning toast plus a status line; unexpected errors are logged on the server with their
  traceback and shown as one line.
* **One model set, one request at a time.** Handlers share the session's models; every model call goes
  through one queue (``concurrency_id="models"``), so concurrent visitors wait in line with a visible position
  and progress, rather than racing on the models' caches.
* **Local by default.** :func:`launch` binds 127.0.0.1 and never shares unless asked (``GRADIO_SHARE`` is
  ignored: ``share`` is always passed explicitly).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by Gradio at import and by every Blocks: set it first

import gradio as gr  # noqa: E402

from llavaseg.demo.chat import ChatState, chat_turn
from llavaseg.demo.render import (attributes_view, comparison_markdown, header_markdown, prompts_markdown,
                                  summary_markdown, timings_markdown)
from llavaseg.demo.session import DemoConfig, DemoSession, Example, read_upload, tiny_world_examples
from llavaseg.errors import InputError, LlavasegError, UntrainedError
from llavaseg.images import check_query

__all__ = ["THEME", "DemoHandlers", "build_app", "failure_message", "launch", "serve"]

logger = logging.getLogger(__name__)

THEME = gr.themes.Base(
    primary_hue="pink", secondary_hue="slate", neutral_hue="slate",
    font=("system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"),
    font_mono=("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"))
"""System fonts only: Gradio's themes otherwise name web fonts, which a browser may fetch from the internet."""

MODELS_QUEUE = {"concurrency_limit": 1, "concurrency_id": "models"}
"""Every event that runs a model shares one worker: requests queue instead of racing on the models."""


def failure_message(error: BaseException) -> str:
    """One line for the page (and a warning toast) from any failure; unexpected ones are logged in full on the
    server, never sent to the browser."""
    if isinstance(error, LlavasegError):
        lines = str(error).strip().splitlines()
        message = lines[0] if lines else type(error).__name__
    elif isinstance(error, OSError):
        message = f"{error.strerror or type(error).__name__}{': ' + str(error.filename) if error.filename else ''}"
    else:
        logger.exception("demo request failed")
        message = f"internal error ({type(error).__name__}); the server log has the details"
    gr.Warning(message)
    return f"⚠️ **Could not run:** {message}"


def _query(text: object, what: str = "query") -> str:
    """A non-empty query, or a message that says what to type."""
    try:
        return check_query(text)
    except InputError as error:
        raise InputError(f"type a {what} first" if str(error) == "query is empty" else str(error)) from None


class DemoHandlers:
    """The page's event handlers over one :class:`DemoSession` (bound methods, so Gradio sees their
    parameters and injects progress)."""

    def __init__(self, session: DemoSession) -> None:
        self.session = session

    def _progress(self, progress: gr.Progress, fraction: float, what: str) -> None:
        if not self.session.loaded:
            progress(0.05, desc="loading the models (first request only)…")
        progress(fraction, desc=what)

    def segment(self, image: object, query: object, route: str,
                progress: gr.Progress = gr.Progress()) -> tuple[object, ...]:
        """Overlay, summary, answer, description, attributes, prompts, timings, mask PNG, result JSON."""
        try:
            pixels, text = read_upload(image), _query(query)
            self._progress(progress, 0.3, f"running {route}…")
            saved = self.session.segment(pixels, text, route)
        except Exception as error:  # noqa: BLE001 - every failure becomes a line on the page
            return None, failure_message(error), "", "", None, "", "", None, None
        result = saved.result
        return (saved.overlay, summary_markdown(result), result.answer or "", result.description,
                attributes_view(result), prompts_markdown(result), timings_markdown(result), str(saved.mask_png),
                str(saved.result_json))

    def compare(self, image: object, query: object, first: str, second: str,
                progress: gr.Progress = gr.Progress()) -> tuple[object, ...]:
        """Two routes on the same image and query: both overlays, a field-by-field table, both results' JSON."""
        try:
            pixels, text = read_upload(image), _query(query)
            if first == second:
                raise InputError("pick two different routes to compare")
            self._progress(progress, 0.2, f"running {first}…")
            a = self.session.segment(pixels, text, first)
            progress(0.6, desc=f"running {second}…")
            b = self.session.segment(pixels, text, second)
        except Exception as error:  # noqa: BLE001
            return None, None, failure_message(error), "", None
        both = self.session.save_json({first: a.result.model_dump(mode="json"),
                                       second: b.result.model_dump(mode="json")}, "comparison.json")
        return a.overlay, b.overlay, "", comparison_markdown(a.result, b.result), str(both)

    def chat(self, image: object, text: object, segment: bool, route: str, state: ChatState | None,
             progress: gr.Progress = gr.Progress()) -> tuple[object, ...]:
        """Chatbot messages, state, the cleared textbox, status, and the turn's overlay and mask (if asked)."""
        messages = list(state.messages) if state is not None else []
        try:
            pixels = read_upload(image)
            self._progress(progress, 0.3, "the MLLM is answering…" + (f" then {route} segments" if segment else ""))
            state, turn = chat_turn(self.session, state, pixels, text, segment=bool(segment), route=route)
        except Exception as error:  # noqa: BLE001
            return messages, state, gr.skip(), failure_message(error), None, None
        saved = turn.segmentation
        status = " ".join(f"⚠️ {notice}" for notice in turn.notices)
        return (list(state.messages), state, "", status, saved.overlay if saved else None,
                str(saved.mask_png) if saved else None)

    def clear_chat(self) -> tuple[object, ...]:
        """An empty conversation (the next turn starts a new one on the current image)."""
        return [], None, "", "", None, None


def _route_dropdown(routes: list[str], label: str, value: str, elem_id: str) -> gr.Dropdown:
    return gr.Dropdown(choices=routes, value=value, label=label, elem_id=elem_id, interactive=True)


def _result_column(prefix: str) -> list[gr.components.Component]:
    """The outputs of one segmentation, in :meth:`DemoHandlers.segment`'s order."""
    status = gr.Markdown(label="Status", elem_id=f"{prefix}-status")
    with gr.Row(equal_height=False):
        overlay = gr.Image(label="Mask overlay", type="numpy", format="png", interactive=False, height=320,
                           elem_id=f"{prefix}-overlay")
        with gr.Column():
            answer = gr.Textbox(label="The MLLM's ordinary answer to the query", interactive=False,
                                elem_id=f"{prefix}-answer")
            description = gr.Textbox(label="Description (stage 1)", interactive=False,
                                     elem_id=f"{prefix}-description")
            attributes = gr.JSON(label="Attributes (stage 2, parsed)", elem_id=f"{prefix}-attributes")
    with gr.Accordion("Rendered prompts and the MLLM's replies", open=False):
        prompts = gr.Markdown(label="Prompts", elem_id=f"{prefix}-prompts")
    with gr.Accordion("Timings per stage", open=False):
        timings = gr.Markdown(label="Timings", elem_id=f"{prefix}-timings")
    with gr.Row():
        mask_file = gr.File(label="Mask PNG", interactive=False, elem_id=f"{prefix}-mask-file")
        json_file = gr.File(label="Result JSON", interactive=False, elem_id=f"{prefix}-json-file")
    return [overlay, status, answer, description, attributes, prompts, timings, mask_file, json_file]


def _segment_tab(handlers: DemoHandlers, image: gr.Image, routes: list[str], examples: list[Example]) -> None:
    with gr.Row():
        query = gr.Textbox(label="Query", placeholder="e.g. the circle that has the same colour as the square",
                           elem_id="seg-query", scale=4)
        route = _route_dropdown(routes, "Route", routes[0], "seg-route")
    run = gr.Button("Segment", variant="primary", elem_id="seg-run")
    if examples:
        gr.Examples(examples=[[str(e.image), e.query] for e in examples], inputs=[image, query],
                    label="Tiny-world examples (click one, then Segment)")
    outputs = _result_column("seg")
    run.click(handlers.segment, inputs=[image, query, route], outputs=outputs, api_name="segment",
              preprocess=False, **MODELS_QUEUE)
    query.submit(handlers.segment, inputs=[image, query, route], outputs=outputs, api_name=False,
                 preprocess=False, **MODELS_QUEUE)


def _compare_tab(handlers: DemoHandlers, image: gr.Image, routes: list[str]) -> None:
    with gr.Row():
        query = gr.Textbox(label="Query", elem_id="cmp-query", scale=3)
        first = _route_dropdown(routes, "Route A", routes[0], "cmp-route-a")
        second = _route_dropdown(routes, "Route B", routes[-1], "cmp-route-b")
    run = gr.Button("Run both", variant="primary", elem_id="cmp-run")
    status = gr.Markdown(label="Status", elem_id="cmp-status")
    with gr.Row():
        overlay_a = gr.Image(label="Route A", type="numpy", format="png", interactive=False, elem_id="cmp-overlay-a")
        overlay_b = gr.Image(label="Route B", type="numpy", format="png", interactive=False, elem_id="cmp-overlay-b")
    table = gr.Markdown(label="Comparison", elem_id="cmp-table")
    both = gr.File(label="Both results (JSON)", interactive=False, elem_id="cmp-json-file")
    run.click(handlers.compare, inputs=[image, query, first, second],
              outputs=[overlay_a, overlay_b, status, table, both], api_name="compare", preprocess=False, **MODELS_QUEUE)


def _chat_tab(handlers: DemoHandlers, image: gr.Image, routes: list[str]) -> None:
    state = gr.State(None)
    chatbot = gr.Chatbot(label="Chat with the frozen MLLM about the image", height=360, elem_id="chat-history")
    with gr.Row():
        text = gr.Textbox(label="Message", placeholder="Ask about the image…", elem_id="chat-text", scale=4)
        segment = gr.Checkbox(label="Also segment what this turn says", value=False, elem_id="chat-segment")
        route = _route_dropdown(routes, "Route for masks", routes[0], "chat-route")
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="chat-send")
        clear = gr.Button("Clear", elem_id="chat-clear")
    status = gr.Markdown(label="Status", elem_id="chat-status")
    with gr.Row():
        overlay = gr.Image(label="This turn's mask", type="numpy", format="png", interactive=False,
                           elem_id="chat-overlay")
        mask_file = gr.File(label="Mask PNG", interactive=False, elem_id="chat-mask-file")
    outputs = [chatbot, state, text, status, overlay, mask_file]
    send.click(handlers.chat, inputs=[image, text, segment, route, state], outputs=outputs, api_name="chat",
               preprocess=False, **MODELS_QUEUE)
    text.submit(handlers.chat, inputs=[image, text, segment, route, state], outputs=outputs, api_name=False,
                preprocess=False, **MODELS_QUEUE)
    clear.click(handlers.clear_chat, inputs=None, outputs=outputs, api_name="clear_chat", queue=False)


def build_app(session: DemoSession, examples: list[Example] | None = None) -> gr.Blocks:
    """The page over ``session``. ``examples``: images and queries offered for one click (tiny-world scenes).

    Events read raw input values (``preprocess=False``) so that the upload is decoded by the library, with its
    one-line errors; Gradio still checks that an uploaded path lies in its upload folder before any handler
    runs."""
    routes = session.routes()
    if not routes:
        raise UntrainedError("no demo route can run with these components: "
                             + "; ".join(session.route_problems().values()))
    handlers = DemoHandlers(session)
    with gr.Blocks(title="LLaVASeg demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(header_markdown(session.config.label, session.config.notices, session.untrained(),
                                    session.route_problems()), elem_id="header")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                image = gr.Image(label="Image", type="filepath",
                                 sources=["upload", "clipboard"], height=360, elem_id="image")
            with gr.Column(scale=5), gr.Tabs():
                with gr.Tab("Segment", id="segment"):
                    _segment_tab(handlers, image, routes, examples or [])
                with gr.Tab("Side by side", id="compare"):
                    _compare_tab(handlers, image, routes)
                with gr.Tab("Chat", id="chat"):
                    _chat_tab(handlers, image, routes)
    return app


def launch(app: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           max_file_mb: int = 25, block: bool = True, quiet: bool = False) -> tuple[object, str, str | None]:
    """Serve ``app`` behind one queue. Local unless ``host``/``share`` say otherwise; ``block=False`` returns
    at once (tests), with the app's local URL. Returns Gradio's ``(app, local_url, share_url)``."""
    app.queue(max_size=64, default_concurrency_limit=1)
    return app.launch(server_name=host, server_port=port, share=bool(share), theme=THEME,
                      max_file_size=f"{max_file_mb}mb", ssr_mode=False, show_error=False, pwa=False,
                      mcp_server=False, enable_monitoring=False, prevent_thread_lock=not block, quiet=quiet,
                      inbrowser=False)


def serve(config: DemoConfig, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
          max_file_mb: int = 25, preload: bool = False, examples: bool = True) -> int:
    """Build the session and the page, and serve until interrupted (what ``llavaseg demo`` runs). A SIGTERM
    (a service manager, ``kill``) stops it like Ctrl-C, so the server closes and the work folder is removed."""
    session = DemoSession(config)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        if preload:
            session.preload(session.routes()[0] if session.routes() else None)
        scenes = tiny_world_examples(session.workdir / "examples") if examples else []
        app = build_app(session, scenes)
        try:
            launch(app, host=host, port=port, share=share, max_file_mb=max_file_mb)
        except KeyboardInterrupt:  # before Gradio's own serving loop took over: stopping is not an error
            app.close()
    finally:
        session.close()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: Gradio's serving loop then closes the server and :func:`serve` cleans up."""
    raise KeyboardInterrupt
