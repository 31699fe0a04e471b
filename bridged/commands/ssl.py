"""SSL client settings: AT+CIPSSLCCONF, AT+CIPSSLCCN, AT+CIPSSLCSNI,
AT+CIPSSLCALPN, AT+CIPSSLCPSK, AT+CIPSSLCPSKHEX.

Each is kept per link and applies to the next AT+CIPSTART "SSL" on that link
(spec notes: "run this command before establishing the SSL connection").  In
multiple-connection mode link id 5 ("max") sets every link; the queries list
one line per link, link 0 alone in single-connection mode.  The certificates
themselves live in bridged's certificate store (``bridged pki``); a missing
one makes AT+CIPSTART answer ERROR, with the reason in the log.

Auth modes 2 and 3 check the server certificate's dates against the
device's SNTP clock (``[sntp] source = "servers"``): an ESP32 without SNTP
time (1970) fails the handshake (esp-at-behavior.md 5.2).  The time goes to
the worker with the request (``tls_time``).

AT+CIPSSLCPSK's <"psk"> is the key and <"hint"> the identity the client
sends, as ESP-AT's esp-tls ``psk_hint_key`` uses them.
"""

from __future__ import annotations

import dataclasses
import ssl

from bridged.at.errors import ExecFail, ParamCountMismatch, ParamInvalid
from bridged.at.format import info, q
from bridged.at.params import Int, Str, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import ConnectSpec, Context
from bridged.commands.options import SslClientConf
from bridged.commands.registry import Reply, handles
from bridged.commands.sntp import tls_time

__all__ = ["with_tls"]

ALL_LINKS = 5


def with_tls(ctx: Context, link_id: int, spec: ConnectSpec) -> ConnectSpec:
    """The link's SSL settings, added to a connection request."""
    st = ctx.state
    conf = st.sslconf[link_id]
    psk, hint = st.sslpsk[link_id]
    return dataclasses.replace(
        spec, tls_auth=conf.auth_mode, tls_pki=conf.pki_number, tls_ca=conf.ca_number, tls_cn=st.sslcn[link_id],
        tls_sni=st.sslsni[link_id], tls_alpn=st.sslalpn[link_id], tls_psk=psk, tls_psk_hint=hint,
        tls_time=tls_time(ctx),
    )


def _targets(ctx: Context, tokens: tuple) -> tuple[list[int], tuple]:
    """(link ids, remaining tokens): the leading link id in multiple mode, 5 = all."""
    if not ctx.mux:
        return [0], tokens
    (link_id,) = bind(tokens[:1], (Int(0, ALL_LINKS),))
    if link_id == ALL_LINKS:
        return list(range(ctx.links.count)), tokens[1:]
    if link_id >= ctx.links.count:
        raise ParamInvalid(f"link id {link_id} out of range", 1)
    return [link_id], tokens[1:]


def _query_ids(ctx: Context) -> range:
    return range(ctx.links.count) if ctx.mux else range(1)


@handles("+CIPSSLCCONF", Kind.QUERY)
def sslcconf_query(ctx: Context, line: CommandLine) -> Reply:
    return Reply(b"".join(info("+CIPSSLCCONF", i, *ctx.state.sslconf[i].fields()) for i in _query_ids(ctx)))


@handles("+CIPSSLCCONF", Kind.SET)
def sslcconf_set(ctx: Context, line: CommandLine) -> Reply:
    ids, rest = _targets(ctx, line.tokens)
    auth, pki, ca = bind(rest, (Int(0, 3), Int(0, 9, 0), Int(0, 9, 0)))
    for i in ids:
        ctx.state.sslconf[i] = SslClientConf(auth, pki, ca)
    ctx.state.persist(ctx.store, "sslconf")
    return Reply()


def _string_setting(name: str, attr: str, max_len: int):
    @handles(name, Kind.QUERY)
    def query(ctx: Context, line: CommandLine) -> Reply:
        values = getattr(ctx.state, attr)
        return Reply(b"".join(info(name, i, q(values[i])) for i in _query_ids(ctx)))

    @handles(name, Kind.SET)
    def set_(ctx: Context, line: CommandLine) -> Reply:
        ids, rest = _targets(ctx, line.tokens)
        (value,) = bind(rest, (Str(max_len),))
        for i in ids:
            getattr(ctx.state, attr)[i] = value
        return Reply()

    return query, set_


cn_query, cn_set = _string_setting("+CIPSSLCCN", "sslcn", 64)
sni_query, sni_set = _string_setting("+CIPSSLCSNI", "sslsni", 64)


@handles("+CIPSSLCALPN", Kind.QUERY)
def sslcalpn_query(ctx: Context, line: CommandLine) -> Reply:
    lines = (info("+CIPSSLCALPN", i, *(q(p) for p in ctx.state.sslalpn[i])) for i in _query_ids(ctx))
    return Reply(b"".join(lines))


@handles("+CIPSSLCALPN", Kind.SET)
def sslcalpn_set(ctx: Context, line: CommandLine) -> Reply:
    ids, rest = _targets(ctx, line.tokens)
    (count,) = bind(rest[:1], (Int(0, 5),))
    if len(rest) - 1 != count:
        raise ParamCountMismatch(f"<counts> is {count} but {len(rest) - 1} protocols follow")
    protocols = bind(rest[1:], tuple(Str(255, min_len=1) for _ in range(count)))
    for i in ids:
        ctx.state.sslalpn[i] = tuple(protocols)
    return Reply()


def _psk_set(ctx: Context, line: CommandLine, hex_form: bool) -> Reply:
    ids, rest = _targets(ctx, line.tokens)
    psk, hint = bind(rest, (Str(64 if hex_form else 32, min_len=1), Str(32)))
    if hex_form:
        try:
            key = bytes.fromhex(psk)
        except ValueError:
            raise ParamInvalid("the PSK is not hexadecimal", 1) from None  # the key itself is never logged
        if not 1 <= len(key) <= 32:
            raise ParamInvalid("a PSK is 1 to 32 bytes", 1)
    else:
        key = psk.encode("latin-1")
    if not hasattr(ssl.SSLContext, "set_psk_client_callback"):
        raise ExecFail("TLS-PSK needs Python 3.13 or newer (ssl.SSLContext.set_psk_client_callback)")
    for i in ids:
        ctx.state.sslpsk[i] = (key.hex(), hint)
    return Reply()


def _psk_query(ctx: Context, name: str, hex_form: bool) -> Reply:
    lines = b""
    for i in _query_ids(ctx):
        key, hint = ctx.state.sslpsk[i]
        shown = key if hex_form else bytes.fromhex(key).decode("latin-1")
        lines += info(name, i, q(shown), q(hint))
    return Reply(lines)


@handles("+CIPSSLCPSK", Kind.QUERY)
def sslcpsk_query(ctx: Context, line: CommandLine) -> Reply:
    return _psk_query(ctx, "+CIPSSLCPSK", hex_form=False)


@handles("+CIPSSLCPSK", Kind.SET)
def sslcpsk_set(ctx: Context, line: CommandLine) -> Reply:
    return _psk_set(ctx, line, hex_form=False)


@handles("+CIPSSLCPSKHEX", Kind.QUERY)
def sslcpskhex_query(ctx: Context, line: CommandLine) -> Reply:
    return _psk_query(ctx, "+CIPSSLCPSKHEX", hex_form=True)


@handles("+CIPSSLCPSKHEX", Kind.SET)
def sslcpskhex_set(ctx: Context, line: CommandLine) -> Reply:
    return _psk_set(ctx, line, hex_form=True)
