"""HPACK header blocks on a relay that forwards frames.

The two hops are treated differently, for a reason the conformance suite gives.

* **Toward the server** the relay advertises ``SETTINGS_HEADER_TABLE_SIZE = 0``.
  Once the server has acknowledged that, its encoder must open its next header
  block with a dynamic table size update to 0 (RFC 7541 §4.2), and every block
  from then on is *self-contained*: it refers to the static table only, so it
  decodes the same whatever came before, and it can be forwarded to the client
  as it is, or dropped, without any HPACK state drifting apart. A server that
  acknowledges the setting and then opens a block without the update ignores
  it: ``CompressionError``, a connection error. Blocks the server sent before
  its acknowledgement may use the default table; those are re-encoded.
* **Toward the client** the relay keeps the default 4,096-byte table. A client
  told 0 must shrink its table, and h2spec's generic cases send table size
  updates to 128 and 4,096 that a decoder must accept while its hpack cases
  want anything above the advertised size refused: both can hold only with the
  default. Request blocks are judged anyway, so they are decoded; what goes on
  to the server is re-encoded with ``encode_block``.

``encode_block`` never indexes, so what the relay writes is self-contained,
and blocks it writes and blocks it forwards can be mixed in any order on one hop.

``BlockDecoder.generation`` changes whenever the dynamic table does. A block
whose decoding left it unchanged decodes the same for as long as the
generation stays, so the relay may remember what it made of such a block by
its bytes: a connection that repeats a request (a gRPC method, a poll) is
decoded and validated once.
"""

from __future__ import annotations

from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hpack.table import HeaderTable

Headers = list[tuple[bytes, bytes]]


class CompressionError(Exception):
    """An HPACK block that does not decode: COMPRESSION_ERROR (RFC 9113 §4.3)."""


class HeaderListTooLarge(Exception):
    """The decoded list passed the hard cap: decoding stopped (ENHANCE_YOUR_CALM)."""


class _CountingTable(HeaderTable):
    """hpack's dynamic table, counting its changes."""

    generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        was_empty = not self.dynamic_entries
        super().add(name, value)
        if not (was_empty and not self.dynamic_entries):
            self.generation += 1

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        # A new size changes what later insertions keep, even when no entry goes.
        if newmax != self._maxsize:
            self.generation += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


class BlockDecoder:
    """Decodes one peer's header blocks.

    ``zero_table``: we advertised a table of size 0 to this peer; once it
    acknowledges (``acknowledged()``), its next block must shrink its table to 0.
    """

    __slots__ = ("_decoder", "_table", "_zero_table", "_expect_update", "generation")

    def __init__(self, hard_header_list_size: int, *, zero_table: bool) -> None:
        self._decoder = Decoder(max_header_list_size=hard_header_list_size)
        self._table = self._decoder.header_table = _CountingTable()
        self._zero_table = zero_table
        self._expect_update = False
        # Changes whenever the dynamic table changes (or an update is due). Only a
        # decode or an acknowledgement changes it: a plain attribute, set by them,
        # since the relay reads it twice per request.
        self.generation = self._table.generation

    def acknowledged(self) -> None:
        """The peer acknowledged our SETTINGS."""
        if self._zero_table:
            self._expect_update = True
            self.generation = -1

    def decode(self, block: bytes) -> tuple[Headers, bool]:
        """(the header list, whether ``block`` was self-contained)."""
        decoder = self._decoder
        try:
            if self._expect_update:
                self._expect_update = False
                if not (block[:1] and block[0] & 0xE0 == 0x20):  # a dynamic table size update
                    raise CompressionError(
                        "the peer acknowledged SETTINGS_HEADER_TABLE_SIZE 0 and did not "
                        "shrink its table (RFC 7541 §4.2)"
                    )
                decoder.max_allowed_table_size = 0
            try:
                headers: Headers = decoder.decode(block, raw=True)  # type: ignore[assignment]
            except OversizedHeaderListError as exc:
                raise HeaderListTooLarge(str(exc)) from exc
            except HPACKError as exc:
                raise CompressionError(f"{type(exc).__name__}: {exc}") from exc
            except (IndexError, ValueError) as exc:  # truncated integers and strings
                raise CompressionError(f"truncated header block: {exc}") from exc
        finally:
            self.generation = self._table.generation
        # Updates may only open a block (hpack enforces it), so a table of size 0
        # now was empty for every field of this block.
        return headers, decoder.header_table_size == 0


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 §5.1) with ``first``'s high bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_field(name: bytes, value: bytes) -> bytes:
    """One field as a literal without indexing, new name, no Huffman (RFC 7541 §6.2.2)."""
    return b"\x00" + _integer(len(name), 7, 0) + name + _integer(len(value), 7, 0) + value


def encode_block(headers: Headers) -> bytes:
    """A self-contained block of ``encode_field`` literals: it never touches the
    receiver's dynamic table."""
    return b"".join([encode_field(name, value) for name, value in headers])
