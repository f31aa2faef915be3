"""Regressions found by the secrets suite (tests/integration/test_secrets.py), on the
in-memory drivers: where userData goes when the CLI saves a plan."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from typer.testing import CliRunner

from reconciler.cli.app import app

CANARY = "rc-canary-0003+/="


def _cloud(write_manifests) -> Path:
    return write_manifests("""\
        apiVersion: reconciler/v1
        kind: Tenant
        metadata: {name: acme}
        ---
        apiVersion: reconciler/v1
        kind: Image
        metadata: {name: tiny, tenant: acme}
        spec: {source: /var/lib/reconciler/images/tiny.qcow2}
        ---
        apiVersion: reconciler/v1
        kind: Instance
        metadata: {name: vm, tenant: acme}
        spec:
          image: tiny
          userData: |
            #cloud-config
            password: %s
        """ % CANARY)


def test_plan_out_over_a_world_readable_file_never_writes_the_secret_into_it(
    host_config_file: Path, write_manifests, tmp_path: Path
) -> None:
    """`plan --out FILE` where FILE exists, 0644 (an older plan, a `touch`): the secret goes
    into a new 0600 file renamed over it, never into the old file, which a reader may
    hold open (so a chmod afterwards would come too late)."""
    out = tmp_path / "plan.json"
    out.write_text("{}\n")
    os.chmod(out, 0o644)
    with open(out) as reader:  # e.g. another user's process, opened while it was 0644
        result = CliRunner().invoke(app, ["plan", "--out", str(out), str(_cloud(write_manifests))])
        assert result.exit_code == 0, result.output
        assert CANARY not in reader.read()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert CANARY in out.read_text()  # the saved plan must carry its target
    assert CANARY not in result.output
    assert "userData = (sensitive)" in result.output
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_plan_out_to_an_unwritable_place_is_an_error_not_a_traceback(
    host_config_file: Path, write_manifests, tmp_path: Path
) -> None:
    result = CliRunner().invoke(app, ["plan", "--out", str(tmp_path / "no" / "such" / "plan.json"),
                                      str(_cloud(write_manifests))])
    assert result.exit_code == 1, result.output
    assert "cannot save the plan to" in result.output and "No such file or directory" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
