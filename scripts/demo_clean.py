"""`make demo-clean`: remove everything `make demo` made, data included.

The example keeps a volume and a bucket on removal (`deletionPolicy: Retain`, as a real
cloud should), so a plain `destroy` would orphan them. This applies a copy of the
manifests whose volumes and buckets say `deletionPolicy: Delete` (buckets also
`purgeOnDelete: true`), which changes only those marks, then destroys that copy, checks
that `reconciler status` finds nothing left, and removes the demo's state directory.

    python scripts/demo_clean.py HOST_CONFIG MANIFESTS
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECONCILER = REPO / ".venv" / "bin" / "reconciler"


def reconciler(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RECONCILER_HOST_CONFIG": str(config)}
    result = subprocess.run([str(RECONCILER), *args], text=True, env=env, stdin=subprocess.DEVNULL,
                            capture_output=args[0] == "status", timeout=1800)
    if result.returncode != 0:
        sys.exit(f"reconciler {' '.join(args)} exited {result.returncode}")
    return result


def main() -> int:
    config, manifests = Path(sys.argv[1]), Path(sys.argv[2])
    state_dir = Path(yaml.safe_load(config.read_text())["stateDir"])
    if not (state_dir / "journal.sqlite3").exists():
        print(f"nothing to clean: {state_dir} holds no demo")
        shutil.rmtree(state_dir, ignore_errors=True)
        return 0
    copy = state_dir / "demo-clean-manifests"
    shutil.rmtree(copy, ignore_errors=True)
    for src in sorted(manifests.rglob("*.y*ml")):
        docs = [d for d in yaml.safe_load_all(src.read_text()) if d]
        for d in docs:
            if d.get("kind") in ("Volume", "Bucket"):
                d["spec"]["deletionPolicy"] = "Delete"
                if d["kind"] == "Bucket":
                    d["spec"]["purgeOnDelete"] = True
        out = copy / src.relative_to(manifests)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    print("Volumes and buckets set to deletionPolicy: Delete, then everything destroyed:")
    reconciler(config, "apply", str(copy), "--yes")
    reconciler(config, "destroy", str(copy), "--yes")
    left = json.loads(reconciler(config, "status", "--json").stdout)
    if left:
        print("still on the host: " + ", ".join(f"{r['kind']} {r['tenant']}/{r['name']}" for r in left))
        return 1
    shutil.rmtree(state_dir)
    print(f"Nothing of the demo is left; {state_dir} removed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
