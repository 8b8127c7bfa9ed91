"""A free loopback TCP port for the servers and torchrun rendezvous the tests start."""
import socket


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (bound, then released). Another process
    could take it before ours binds it; each torchrun job or server asks for its own."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
