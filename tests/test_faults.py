"""Registry faults (a blob's place taken by a directory, the blob directory a file): every command that
reads the blob says so in one line with exit 1 (damage, not a bad input), and `registry check` reports the
fault instead of stopping at it."""

import json
import shutil

import pytest

from tests.conftest import registry_state
from tests.test_cli_bad_input import seeded  # noqa: F401  (fixture)


def _blob(home):
    from loraplex.registry.store import Registry

    reg = Registry(home)
    return reg.blob_path(reg.get_adapter("good").blob)


@pytest.mark.parametrize("damage", ["blob-is-a-directory", "blobs-is-a-file"])
def test_a_blob_that_cannot_be_read_is_damage(cli, seeded, tmp_path, damage):
    path = _blob(cli.home)
    if damage == "blob-is-a-directory":  # was exit 2 "Is a directory", and `registry check` stopped there
        path.unlink()
        path.mkdir()
    else:
        shutil.rmtree(cli.home / "blobs")
        (cli.home / "blobs").write_text("not a directory")
    before = registry_state(cli.home)
    for args in (("query", "late flight", "--adapters", "good"), ("adapters", "export", "good", tmp_path / "out")):
        r = cli(*args)
        err = r.stderr.strip()
        assert r.exit_code == 1, (r.exit_code, err)
        assert err.startswith("error: blob ") and "cannot be read" in err and len(err.splitlines()) == 1, err
    r = cli("registry", "check", "--json")
    assert r.exit_code == 1, r.output
    rep = json.loads(r.stdout)
    assert any("adapter 'good': blob" in p and "cannot be read" in p for p in rep["problems"]), rep
    assert registry_state(cli.home) == before
