"""A child process that records (and refuses) every attempt to reach beyond this machine, for tests that
run a command as a user would and check that it never touches the network.

    subprocess.run([sys.executable, "-c", NO_NETWORK + "...the command...\\n" + REPORT_NETWORK], ...)
"""

NO_NETWORK = """
import socket, sys
tried = []
def resolve(host, *a, **kw):
    if host not in ("localhost", "127.0.0.1", "::1", None):
        tried.append(repr(host))
        raise socket.gaierror("name lookup refused by the test")
    return _resolve(host, *a, **kw)
def connect(self, address, *a):
    if self.family != socket.AF_UNIX and address[0] not in ("127.0.0.1", "::1"):
        tried.append(repr(address))
        raise OSError("network refused by the test")
    return _connect(self, address, *a)
_resolve, _connect = socket.getaddrinfo, socket.socket.connect
socket.getaddrinfo, socket.socket.connect = resolve, connect
"""

REPORT_NETWORK = 'print("NETWORK:", tried, file=sys.stderr)\n'
