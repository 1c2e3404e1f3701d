"""`cliprpn batch`: derain whole shoots / video frames, in-process or through ComfyUI servers.

INPUT is a folder, a glob or a list file (one path a line). With ``--server URL`` (repeatable)
every image is uploaded to a running ComfyUI, an API-format workflow (ours or the user's, its image
input found and replaced) is queued, progress is followed over the websocket (``/history`` polling
when no websocket), and the result is downloaded and written under the image's own name.
Without ``--server`` the core model runs in this process; with ``--backend ray`` it runs on a Ray cluster (Ray
Data, one model per actor; see ``ray_backend.py``), planned, resumed and reported the same way.

- servers share the work by queue depth (ours in flight + other clients' prompts);
- a server that goes away has its in-flight images re-queued on the others (not counted as retries);
- a failed image is retried (preferably elsewhere), then reported as failed; an HTTP 5xx, a junk
  answer or a downloaded result that does not decode as an image is such a (retryable) failure;
- outputs are written atomically (temp file + os.replace); a rerun skips complete outputs
  (``--overwrite`` redoes them); Ctrl-C deletes/interrupts our prompts, writes the report, exits 130;
- bad input (missing, empty, unreadable file; a workflow without an image input) is reported per
  image and does not stop the rest.

One file, one job:

- ``errors.py``    BatchError (retryable or not), BadInput, WorkflowError, ServerUnreachable
- ``inputs.py``    jobs, output names, input checks, atomic output writing
- ``workflow.py``  loading / checking / rewriting API workflows, pattern taps, parsing their text
- ``client.py``    the ComfyUI client (HTTP + websocket, /history records)
- ``backends.py``  Backend, LocalBackend (in-process), ComfyBackend (one server), pick_backend
- ``scheduler.py`` BatchRunner (dispatch, retries, server loss, stop) and the report
- ``ray_backend.py`` RayRunner and DerainActor (``--backend ray``; imports Ray only when a Ray run starts)
- ``cli.py``       the argument parser, cmd_batch, main (``python -m cliprpn_core.batch``)

The ComfyUI protocol goes through two well-kept client libraries, not code of our own:
``requests`` for HTTP (one ``requests.Session`` per server: pooled keep-alive connections,
multipart uploads, timeouts) and ``websocket-client`` for the progress stream (the library
ComfyUI's own ``script_examples/websockets_api_example.py`` uses; it handles the handshake, framing,
masking, fragments and pings). Both are pure Python and do not depend on torch, so they are in
requirements.txt as well as in pyproject.toml. Node class names of this pack come from
``cliprpn_core.node_names``. Never imports ComfyUI; torch only for in-process mode.
"""
from __future__ import annotations

from ..runfiles import LIST_EXTS, clean_partials, collect_inputs, output_complete
from .backends import (
    UPLOAD_SUBFOLDER,
    Backend,
    ComfyBackend,
    LocalBackend,
    pick_backend,
)
from .cli import add_batch_parser, cmd_batch, main
from .client import (
    ComfyClient,
    WebSocket,
    WebSocketClosed,
    history_error,
    history_exec_seconds,
    history_state,
    normalize_url,
)
from .errors import BadInput, BatchError, ServerUnreachable, WorkflowError
from .inputs import Job, Output, check_image_file, make_jobs, output_name, write_output
from .scheduler import REPORT_FIELDS, BatchRunner, write_report
from .workflow import (
    API_WORKFLOWS,
    BUILTIN_BASIC,
    DEFAULT_WORKFLOW,
    DERAIN_NODES,
    EXPERT_AUTO,
    IMAGE_LOADERS,
    LOADER,
    PERCEIVER,
    PREVIEWERS,
    ROUTER,
    SAVERS,
    TEXT_TAP,
    add_pattern_taps,
    check_workflow,
    find_image_node,
    find_output_node,
    load_workflow,
    parse_pattern_text,
    parse_routing_text,
    rewrite_workflow,
    set_expert_check,
    set_verify_light,
)

__all__ = [
    "API_WORKFLOWS",
    "BUILTIN_BASIC",
    "DEFAULT_WORKFLOW",
    "DERAIN_NODES",
    "EXPERT_AUTO",
    "IMAGE_LOADERS",
    "LIST_EXTS",
    "LOADER",
    "PERCEIVER",
    "PREVIEWERS",
    "REPORT_FIELDS",
    "ROUTER",
    "SAVERS",
    "TEXT_TAP",
    "UPLOAD_SUBFOLDER",
    "Backend",
    "BadInput",
    "BatchError",
    "BatchRunner",
    "ComfyBackend",
    "ComfyClient",
    "Job",
    "LocalBackend",
    "Output",
    "ServerUnreachable",
    "WebSocket",
    "WebSocketClosed",
    "WorkflowError",
    "add_batch_parser",
    "add_pattern_taps",
    "check_image_file",
    "check_workflow",
    "clean_partials",
    "cmd_batch",
    "collect_inputs",
    "find_image_node",
    "find_output_node",
    "history_error",
    "history_exec_seconds",
    "history_state",
    "load_workflow",
    "main",
    "make_jobs",
    "normalize_url",
    "output_complete",
    "output_name",
    "parse_pattern_text",
    "parse_routing_text",
    "pick_backend",
    "rewrite_workflow",
    "set_expert_check",
    "set_verify_light",
    "write_output",
    "write_report",
]
