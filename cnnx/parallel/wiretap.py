"""Count the bytes each process writes on each of Dask's TCP connections: the instrument
behind the scaling benchmark and the communication experiment.

Call install() in the driver and, through client.run(wiretap.install), in every worker;
read() returns {(local address, peer address): bytes written} since install.  The counts
live on Dask's TCP class, which each process imports once.
"""
import collections


def install():
    """Start counting in this process (again: a no-op)."""
    from distributed.comm import tcp

    if getattr(tcp.TCP, "_cnnx_tap", None) is not None:
        return
    tcp.TCP._cnnx_tap = collections.Counter()
    write = tcp.TCP.write

    async def counted_write(self, msg, serializers=None, on_error="message"):
        n = await write(self, msg, serializers, on_error)
        tcp.TCP._cnnx_tap[(self.local_address, self.peer_address)] += n
        return n

    tcp.TCP.write = counted_write


def read():
    from distributed.comm import tcp

    return dict(tcp.TCP._cnnx_tap)
