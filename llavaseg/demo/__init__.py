"""``llavaseg demo``: a web page (Gradio, the ``[demo]`` extra) to segment, compare routes and chat with the
frozen MLLM on one image.

Only the Gradio-free parts are imported here (:class:`DemoConfig`, :class:`DemoSession`), so the session and
its checks load without the extra; the page itself is ``llavaseg.demo.app`` (``build_app``, ``launch``,
``serve``), which imports Gradio.
"""

from __future__ import annotations

from llavaseg.demo.session import DEMO_ROUTES, DemoConfig, DemoSession

__all__ = ["DEMO_ROUTES", "DemoConfig", "DemoSession"]
