"""The suite's own guard (tests/conftest.py): no test reads the machine's datasets or caches or the network."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from biformer.train.data import data_search_path


def test_the_dataset_search_path_is_an_empty_folder():
    folders = data_search_path()
    assert len(folders) == 1 and folders[0].is_dir() and not any(folders[0].iterdir())
    assert "BIFORMER_FASHION_MNIST" not in os.environ
    for variable in ("TORCH_HOME", "HF_HOME", "MPLCONFIGDIR"):
        assert Path(os.environ[variable]).parent == folders[0].parent  # the session's temporary folder


@pytest.mark.parametrize("path", ["/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz",
                                  "~/.cache/biformer/fashion-mnist/t10k-labels-idx1-ubyte.gz",
                                  "~/.cache/torch/hub/checkpoints/biformer_tiny.pth"])
def test_opening_the_machines_data_fails(path):
    with pytest.raises(PermissionError, match="hermetic tests: a test opened"):
        open(os.path.expanduser(path), "rb")


def test_the_network_cannot_be_reached():
    with pytest.raises(ConnectionRefusedError, match="no network"):
        socket.getaddrinfo("pypi.org", 443)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as connection, pytest.raises(ConnectionRefusedError):
        connection.connect(("203.0.113.1", 80))  # an address for documentation (TEST-NET-3)
    # the loopback interface stays usable (torch.distributed's gloo tests use it)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
