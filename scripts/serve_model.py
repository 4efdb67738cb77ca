"""Serve a suspect model over HTTP: the reference black-box endpoint that configs/verify.json can query.

Example: ``python scripts/serve_model.py --model models/classifier --port 8000``, then
``python -m monai.bundle run verifying --config_file configs/verify.json --suspect http://127.0.0.1:8000/``.
Binds to 127.0.0.1 unless --host and --allow-remote say otherwise (the endpoint has no authentication). Resources are
bounded: --max-workers handler threads, --timeout seconds per socket operation and body, --max-body-bytes per request.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `xmark_bundle` importable when run as a script

from xmark_bundle.verification import open_suspect, serve  # noqa: E402
from xmark_bundle.verification.server import MAX_BODY_BYTES  # noqa: E402


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, open the model and serve it until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="TorchScript file, classifier ckpt dir or MONAI bundle dir")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback needs --allow-remote)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    parser.add_argument("--outputs", choices=("logits", "probabilities"), default="logits", help="what the model gives")
    parser.add_argument("--device", default="cpu", help="torch device of the model")
    parser.add_argument("--max-workers", type=int, default=4, help="handler threads (more clients wait or get 503)")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body (413 above)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per socket operation and request body")
    parser.add_argument("--header-timeout", type=float, default=5.0, help="seconds for a request's line and headers")
    args = parser.parse_args(argv)
    try:
        model = open_suspect(args.model, outputs=args.outputs, device=args.device)
        server, thread = serve(
            model,
            args.host,
            args.port,
            allow_remote=args.allow_remote,
            max_workers=args.max_workers,
            max_body_bytes=args.max_body_bytes,
            timeout=args.timeout,
            header_timeout=args.header_timeout,
        )
    except (ValueError, OSError) as exc:  # bad model path or file, refused host, port in use
        sys.exit(f"serve_model: error: {exc}")
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {model.location} ({model.kind}) at http://{host}:{server.server_address[1]}/", flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
