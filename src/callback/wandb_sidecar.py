"""VoltTrain's W&B sidecar: reads JSON lines on stdin and logs them through the user's `wandb`.

Shipped inside the volttrain binary (src/callback/wandb.rs) and written to a temporary file at
run time. Protocol, one JSON object per line:

  stdin   {"op": "init", "settings": {...wandb.init keyword arguments...}}
          {"op": "log", "step": N, "data": {"train/loss": ...}}
          {"op": "summary", "data": {...}}
          {"op": "finish", "exit_code": 0}
  stdout  {"event": "ready", "version": "<wandb version>"}       after `import wandb`
          {"event": "missing", "package": "wandb", "detail": ...} when it cannot be imported
          {"event": "finished", "logged": N}                     after run.finish()

Errors go to stderr and end the process with a non-zero status; VoltTrain then drops and counts
what it could not deliver, and trains on.
"""

import json
import os
import sys

# The protocol keeps a private copy of stdout; whatever wandb or user code prints goes to stderr.
PROTO = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)


def say(obj):
    PROTO.write(json.dumps(obj) + "\n")
    PROTO.flush()


def main():
    try:
        import wandb
    except ImportError as e:
        say({"event": "missing", "package": "wandb", "detail": str(e)})
        return 3
    say({"event": "ready", "version": getattr(wandb, "__version__", "unknown")})
    run = None
    logged = 0
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        msg = json.loads(line)
        op = msg.get("op")
        if op == "init":
            settings = {k: v for k, v in msg["settings"].items() if v is not None}
            run = wandb.init(**settings)
            logged += 1
        elif op == "log":
            run.log(msg["data"], step=msg["step"])
            logged += 1
        elif op == "summary":
            for k, v in msg["data"].items():
                run.summary[k] = v
            logged += 1
        elif op == "finish":
            if run is not None:
                run.finish(exit_code=int(msg.get("exit_code", 0)))
            say({"event": "finished", "logged": logged})
            return 0
        else:
            print(f"volttrain wandb sidecar: unknown op {op!r}", file=sys.stderr)
            return 2
    # stdin closed without "finish": VoltTrain went away; close the run as failed.
    if run is not None:
        run.finish(exit_code=1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
