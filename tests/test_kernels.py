"""The C kernels' build (``tadfkd.models.kernels``): a cached library loads only from a folder
no one else writes to, and a failed build says why in one line and leaves nothing behind."""

import pytest

from tadfkd.models import kernels


def test_a_cached_library_is_loaded_only_from_a_folder_no_one_else_writes(tmp_path):
    folder = tmp_path / "kernels"
    folder.mkdir(mode=0o700)
    library = folder / "cpu_kernels-0.so"
    library.write_bytes(b"")
    library.chmod(0o700)
    assert kernels.trusted(library)
    library.chmod(0o720)  # group-writable
    assert not kernels.trusted(library)
    library.chmod(0o700)
    folder.chmod(0o777)
    assert not kernels.trusted(library)


@pytest.mark.parametrize(
    ("compiler", "says"), [("false", "false failed"), ("/no/such/cc", "did not run")]
)
def test_a_failed_build_says_why_in_one_line_and_leaves_no_file(tmp_path, compiler, says):
    failure = kernels.compile_kernels(compiler, tmp_path / "kernels.so")
    assert failure is not None and failure.startswith(compiler) and says in failure
    assert "\n" not in failure
    assert list(tmp_path.iterdir()) == []
