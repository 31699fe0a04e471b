"""AT+MDNS: advertise a host name and one DNS-SD service over mDNS.

``AT+MDNS=1,<"hostname">,<"service_type">,<port>[,<"instance">][,<"proto">]
[,<txt_number>,<"key">,<"value">...]`` starts advertising on the station
interface (bridged.net.mdns); ``AT+MDNS=0`` withdraws it (goodbye packets).
Only the set form exists, as in ESP-AT.  Both answer OK or ERROR only.
Before ESP-AT 4.1 the command ends at ``<port>`` (service "<type>._tcp").

Checks (the spec page gives the shape and txt_number's range [1,10]; the
rest follows ESP-IDF's mdns, which ESP-AT calls):

* enable 0 takes no further parameter ("Please do not set the following
  parameters"); stopping when nothing runs is OK (mdns_free of nothing).
* enable 1 needs hostname, service type and port; the instance defaults to
  the host name, the protocol to _tcp.  Names are 1..63 bytes (one DNS label,
  ESP-IDF's MDNS_NAME_BUF_LEN), UTF-8; the host name has no dot.  The
  service type must be an RFC 6335 name (a leading "_" is added when
  missing); the protocol _tcp or _udp; the port 1..65535 (ESP-IDF refuses 0).
* txt_number 1..10, followed by exactly that many key/value pairs; a key is
  1 or more bytes without "=", and "key=value" fits a TXT string (255 bytes).
* enabling while enabled is ERROR: stop first (esp-at-behavior.md is silent;
  ESP-IDF refuses to add a service that exists).  **UNCONFIRMED** on hardware.
* enabling before the station joins is OK (the spec page and
  esp-at-behavior.md are silent; ESP-IDF's mdns accepts its configuration
  without a netif and answers once the netif is up): the service is
  advertised when AT+CWJAP (or auto-connect) joins, withdrawn with goodbye
  packets on AT+CWQAP or a mode without station, and announced again on the
  next join (bridged.net.mdns follows the station).  AT+MDNS=0 forgets it.
* ERROR when the station is connected but the mDNS sockets cannot be opened
  on its interface (nothing stays configured then).
"""

from __future__ import annotations

from bridged.at.errors import ExecFail, ParamCountMismatch, ParamInvalid, ParamParseFail
from bridged.at.params import OMITTED, Int, Str, Token, bind
from bridged.at.parser import CommandLine, Kind
from bridged.commands.context import Context
from bridged.commands.registry import Reply, handles
from bridged.commands.wifi import station_ip, watch_station
from bridged.net.mdns import Advertisement, check_instance, service_type

__all__: list[str] = []

_LABEL = 63  # bytes in one DNS label
_TXT_STRING = 255  # bytes in one TXT string, "key=value"
_HEAD = (
    Int(0, 1),  # enable
    Str(_LABEL, min_len=1),  # hostname
    Str(_LABEL, min_len=1),  # service type
    Int(1, 65535),  # port
    Str(_LABEL, "", min_len=1),  # instance ("" = the host name)
    Str(8, "_tcp", min_len=1),  # proto
    Int(1, 10, 0),  # txt_number (0 = no TXT pairs given)
)
_BEFORE_4_1 = 4  # parameters before ESP-AT 4.1: enable, hostname, service type, port


def _utf8(text: str, index: int) -> str:
    """Parameters arrive as latin-1 (every byte kept); names are UTF-8."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise ParamInvalid(f"parameter {index} is not UTF-8", index) from None


def _txt_pairs(tokens: tuple[Token, ...], count: int) -> tuple[tuple[bytes, bytes], ...]:
    if len(tokens) != len(_HEAD) + 2 * count:
        raise ParamCountMismatch(
            f"txt_number {count} needs {2 * count} key/value parameters, got {len(tokens) - len(_HEAD)}",
            (len(_HEAD) + 2 * count) << 8 | min(len(tokens), 0xFF),
        )
    pairs = []
    for index in range(len(_HEAD) + 1, len(tokens) + 1, 2):
        key_token, value_token = tokens[index - 1], tokens[index]
        if key_token is OMITTED or value_token is OMITTED:
            raise ParamParseFail(f"TXT key/value {index}/{index + 1} may not be omitted", index)
        key = Str(_TXT_STRING - 1, min_len=1).convert(key_token, index).encode("latin-1")
        value = Str(_TXT_STRING - 1).convert(value_token, index + 1).encode("latin-1")
        if b"=" in key:
            raise ParamInvalid(f"TXT key {key!r} contains '='", index)
        if len(key) + 1 + len(value) > _TXT_STRING:
            raise ParamInvalid(f"TXT entry {key!r} is longer than {_TXT_STRING} bytes", index + 1)
        pairs.append((key, value))
    return tuple(pairs)


def parse_advertisement(tokens: tuple[Token, ...]) -> Advertisement:
    """AT+MDNS=1's parameters, checked.

    Raises:
        AtError subclasses: a missing, extra or invalid parameter.
    """
    head = tokens[: len(_HEAD)]
    _, hostname, service, port, instance, proto, txt_number = bind(head, _HEAD, min_count=4)
    hostname = _utf8(hostname, 2)
    if "." in hostname:
        raise ParamInvalid(f"host name {hostname!r} has a dot: it is one label before .local", 2)
    if any(ord(c) < 0x20 or c == "\x7f" for c in hostname):
        raise ParamInvalid(f"host name {hostname!r} has a control character", 2)
    try:
        type_name = service_type(_utf8(service, 3), proto)
    except ValueError as exc:
        raise ParamInvalid(str(exc), 3) from None
    instance = _utf8(instance, 5) if instance else hostname
    try:
        check_instance(instance, type_name)
    except ValueError as exc:
        raise ParamInvalid(str(exc), 5) from None
    if txt_number == 0 and len(tokens) > len(_HEAD):
        raise ParamCountMismatch("TXT key/value parameters need a txt_number", len(tokens))
    txt = _txt_pairs(tokens, txt_number) if txt_number else ()
    return Advertisement(hostname, type_name, port, instance, txt)


@handles("+MDNS", Kind.SET)
def mdns_set(ctx: Context, line: CommandLine):  # -> Reply | Awaitable[Reply]
    tokens = line.tokens
    (enable,) = bind(tokens[:1], _HEAD[:1])
    if enable == 0:
        if len(tokens) > 1:
            raise ParamCountMismatch("AT+MDNS=0 takes no other parameter", len(tokens))
        return _disable(ctx)
    if len(tokens) > _BEFORE_4_1 and not ctx.personality.mdns_service_options:
        raise ParamCountMismatch("<instance>, <proto> and TXT pairs exist from ESP-AT 4.1",
                                 _BEFORE_4_1 << 8 | min(len(tokens), 0xFF))
    ad = parse_advertisement(tokens)
    if ctx.mdns.enabled:
        raise ExecFail("mDNS is already enabled: AT+MDNS=0 first")
    watch_station(ctx, ctx.mdns.station_changed)
    return _enable(ctx, ad)


async def _enable(ctx: Context, ad: Advertisement) -> Reply:
    try:
        await ctx.mdns.enable(ad, lambda: station_ip(ctx))
    except OSError as exc:
        raise ExecFail(f"cannot open mDNS sockets on the station interface: {exc}") from None
    return Reply()


def _disable(ctx: Context):  # -> Reply | Awaitable[Reply]
    if not ctx.mdns.enabled:
        return Reply()

    async def goodbye() -> Reply:
        await ctx.mdns.disable()
        return Reply()

    return goodbye()
