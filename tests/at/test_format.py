"""Tests for bridged.at.format: the exact bytes bridged sends on the AT port."""

from __future__ import annotations

import pytest

from bridged.at import format as fmt
from bridged.at.errors import Busy, NoAt, UnsupportedCommand

# -- constants -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (fmt.OK, b"\r\nOK\r\n"),
        (fmt.ERROR, b"\r\nERROR\r\n"),
        (fmt.SEND_OK, b"\r\nSEND OK\r\n"),
        (fmt.SEND_FAIL, b"\r\nSEND FAIL\r\n"),
        (fmt.SEND_CANCELED, b"\r\nSEND Canceled\r\n"),
        (fmt.SEND_CANCELLED, b"\r\nSEND CANCELLED\r\n"),
        (fmt.PROMPT, b"\r\nOK\r\n\r\n>"),
        (fmt.BUSY, b"\r\nbusy p...\r\n"),
        (fmt.READY, b"\r\nready\r\n"),
        (fmt.FORCE_RESTART, b"\r\nWill force to restart!!!\r\n"),
        (fmt.QUITT, b"\r\n+QUITT\r\n"),
    ],
)
def test_constants(value, expected):
    """Result codes and banners are byte-exact (spec 1.2, 1.5, 2.4, 2.5, 2.7)."""
    assert type(value) is bytes
    assert value == expected


def test_prompt_has_no_space():
    """The data prompt ends with '>' and no space (v2+; 1.x sent '> ')."""
    assert fmt.PROMPT.endswith(b">")
    assert not fmt.PROMPT.endswith(b"> ")


def test_all_names_exist():
    """Every name in __all__ is defined."""
    for name in fmt.__all__:
        assert hasattr(fmt, name), name


# -- is_final --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        fmt.OK,
        fmt.ERROR,
        fmt.SEND_OK,
        fmt.SEND_FAIL,
        fmt.SEND_CANCELED,
        fmt.SEND_CANCELLED,
        fmt.PROMPT,
        fmt.BUSY,
    ],
)
def test_is_final_true(data):
    """Final result codes end a command or a send."""
    assert fmt.is_final(data)


@pytest.mark.parametrize(
    "data",
    [
        fmt.READY,
        fmt.FORCE_RESTART,
        fmt.QUITT,
        fmt.recv_bytes(5),
        fmt.connect(0),
        fmt.closed(None),
        fmt.info("+CIPMUX", 0),
        fmt.ipd_active(0, 3),
        fmt.ipd_passive(None, 3),
        fmt.wifi("GOT IP"),
        fmt.err_code(0x01090000),
        b"",
        b"OK",
        b"OK\r\n",
        b"\r\nOK\r\n\r\n",
        fmt.OK + fmt.OK,
        b"+CIPMUX:0\r\n" + fmt.OK,
    ],
)
def test_is_final_false(data):
    """Information lines, URCs and anything not exactly a result code are not final."""
    assert not fmt.is_final(data)


# -- fields, info, q -------------------------------------------------------------------------


def test_fields_formats_each_type():
    """q() is quoted, bools are 1/0, bytes verbatim, numbers in decimal."""
    assert fmt.fields(1, fmt.q("a b"), True, False, b"raw", -3, 0) == b'1,"a b",1,0,raw,-3,0'


def test_fields_empty():
    """No values, no bytes."""
    assert fmt.fields() == b""


def test_q_is_latin1():
    """Quoted text is latin-1, so bytes the host sent come back unchanged."""
    raw = bytes(range(256))
    assert fmt.fields(fmt.q(raw.decode("latin-1"))) == b'"' + raw + b'"'


def test_q_replaces_unencodable():
    """Text outside latin-1 cannot crash the formatter: it becomes '?'."""
    assert fmt.fields(fmt.q("a\u20acb")) == b'"a?b"'
    assert fmt.fields("\u20ac") == b"?"


def test_q_does_not_escape():
    """ESP-AT prints strings as stored, without escapes."""
    assert fmt.fields(fmt.q('a"b,c\\')) == b'"a"b,c\\"'


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (fmt.info("+CIPMUX", 0), b"+CIPMUX:0\r\n"),
        (fmt.info("+CWMODE", 3), b"+CWMODE:3\r\n"),
        (fmt.info("+UART_CUR", 115200, 8, 1, 0, 1), b"+UART_CUR:115200,8,1,0,1\r\n"),
        (fmt.info("+CIPSTA", b"ip", fmt.q("192.168.1.5")), b'+CIPSTA:ip,"192.168.1.5"\r\n'),
        (fmt.info("+SYSRAM", 148408, 84044, eol=False), b"+SYSRAM:148408,84044"),
        (fmt.info("+SYSMSG", 0, eol=False), b"+SYSMSG:0"),
        (fmt.info("+CIPDINFO", b"true", eol=False), b"+CIPDINFO:true"),
    ],
)
def test_info(line, expected):
    """Information lines are ``+NAME:fields`` with \\r\\n unless eol=False (spec 1.2)."""
    assert line == expected


def test_info_then_ok_wire_images():
    """The two wire shapes of spec 1.2: a blank line before OK, or none."""
    assert fmt.info("+CIPMUX", 0) + fmt.OK == b"+CIPMUX:0\r\n\r\nOK\r\n"
    assert fmt.info("+SYSRAM", 148408, 84044, eol=False) + fmt.OK == b"+SYSRAM:148408,84044\r\nOK\r\n"


# -- err_code, recv_bytes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (0x01090000, b"ERR CODE:0x01090000\r\n"),
        (0x010B0000, b"ERR CODE:0x010b0000\r\n"),  # lower-case hex, as %08x
        (0x01060203, b"ERR CODE:0x01060203\r\n"),
        (0, b"ERR CODE:0x00000000\r\n"),
    ],
)
def test_err_code(code, expected):
    """The AT+SYSLOG=1 line is ``ERR CODE:0x%08x\\r\\n``."""
    assert fmt.err_code(code) == expected


def test_err_code_from_errors():
    """The spec's examples come out of the error classes' codes (spec 1.10)."""
    assert fmt.err_code(UnsupportedCommand().code) + fmt.ERROR == b"ERR CODE:0x01090000\r\n\r\nERROR\r\n"
    assert fmt.err_code(Busy().code) + fmt.BUSY == b"ERR CODE:0x010b0000\r\n\r\nbusy p...\r\n"
    assert fmt.err_code(NoAt().code) == b"ERR CODE:0x01030000\r\n"


@pytest.mark.parametrize(
    ("n", "expected"), [(1, b"\r\nRecv 1 bytes\r\n"), (8192, b"\r\nRecv 8192 bytes\r\n")]
)
def test_recv_bytes(n, expected):
    """``Recv <n> bytes`` has a leading and a trailing \\r\\n and no singular form."""
    assert fmt.recv_bytes(n) == expected


# -- connection status lines -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (fmt.connect(None), b"CONNECT\r\n"),
        (fmt.connect(0), b"0,CONNECT\r\n"),
        (fmt.connect(4), b"4,CONNECT\r\n"),
        (fmt.closed(None), b"CLOSED\r\n"),
        (fmt.closed(0), b"0,CLOSED\r\n"),
        (fmt.closed(4), b"4,CLOSED\r\n"),
    ],
)
def test_connect_closed(line, expected):
    """Status lines have no leading \\r\\n; link_id None is single-connection mode."""
    assert line == expected


def test_cipstart_wire_image():
    """AT+CIPSTART's success: CONNECT then OK (spec 2.3)."""
    assert fmt.connect(None) + fmt.OK == b"CONNECT\r\n\r\nOK\r\n"
    assert fmt.connect(0) + fmt.OK == b"0,CONNECT\r\n\r\nOK\r\n"


def test_link_conn_spec_example():
    """+LINK_CONN matches the capture in spec 2.3 (status 0, server flag 1)."""
    line = fmt.link_conn(0, "TCP", True, "192.168.4.2", 49469, 80)
    assert line == b'+LINK_CONN:0,0,"TCP",1,"192.168.4.2",49469,80\r\n'


def test_link_conn_client():
    """A client link has server flag 0; the type is printed as given."""
    line = fmt.link_conn(3, "SSLv6", False, "fe80::1", 443, 50000)
    assert line == b'+LINK_CONN:0,3,"SSLv6",0,"fe80::1",443,50000\r\n'


# -- +IPD ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("link_id", "length", "remote", "expected"),
    [
        (None, 5, None, b"\r\n+IPD,5:"),
        (1, 5, None, b"\r\n+IPD,1,5:"),
        (None, 5, ("192.168.1.2", 8080), b'\r\n+IPD,5,"192.168.1.2",8080:'),
        (1, 5, ("192.168.1.2", 8080), b'\r\n+IPD,1,5,"192.168.1.2",8080:'),
        (0, 2920, ("fe80::32ae:a4ff:fe80:65ac", 1), b'\r\n+IPD,0,2920,"fe80::32ae:a4ff:fe80:65ac",1:'),
    ],
)
def test_ipd_active(link_id, length, remote, expected):
    """The four active +IPD headers of spec 2.1: leading \\r\\n, colon, no line end."""
    assert fmt.ipd_active(link_id, length, remote) == expected


def test_ipd_active_remote_defaults_to_none():
    """Without remote (CIPDINFO=0) no address is printed."""
    assert fmt.ipd_active(2, 10) == b"\r\n+IPD,2,10:"


@pytest.mark.parametrize(
    ("link_id", "total", "expected"),
    [(None, 100, b"\r\n+IPD,100\r\n"), (2, 100, b"\r\n+IPD,2,100\r\n"), (0, 1, b"\r\n+IPD,0,1\r\n")],
)
def test_ipd_passive(link_id, total, expected):
    """The passive-mode notice of spec 2.2 ends with \\r\\n, not a colon."""
    assert fmt.ipd_passive(link_id, total) == expected


# -- Wi-Fi -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ("CONNECTED", b"WIFI CONNECTED\r\n"),
        ("GOT IP", b"WIFI GOT IP\r\n"),
        ("GOT IPv6 LL", b"WIFI GOT IPv6 LL\r\n"),
        ("DISCONNECT", b"WIFI DISCONNECT\r\n"),
    ],
)
def test_wifi(event, expected):
    """Wi-Fi status lines: no leading \\r\\n, one trailing (spec 1.16)."""
    assert fmt.wifi(event) == expected


# -- AT+PING ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("ms", "expected"), [(0, b"+PING:0\r\n"), (39, b"+PING:39\r\n"), (1000, b"+PING:1000\r\n")])
def test_ping_time(ms, expected):
    """AT+PING's answer line: +PING:<ms>, no leading \\r\\n (as an ESP32 prints it, esp-at #238)."""
    assert fmt.ping_time(ms) == expected


def test_ping_timeout():
    """The timeout line AT+PING prints before ERROR."""
    assert fmt.PING_TIMEOUT == b"+PING:TIMEOUT\r\n"


@pytest.mark.parametrize(("state", "expected"), [(1, b"+CIPUPDATE:1\r\n"), (4, b"+CIPUPDATE:4\r\n"),
                                                 (-1, b"+CIPUPDATE:-1\r\n")])
def test_ota_progress(state, expected):
    """AT+CIUPDATE's progress lines (spec page, at_ota_cmd.c)."""
    assert fmt.ota_progress(state) == expected


def test_ota_state_uses_the_command_name():
    """AT+CIUPDATE? prints +CIUPDATE:, not the page's +CIPUPDATE: (esp-at-behavior.md 6.1)."""
    assert fmt.ota_state(-1) == b"+CIUPDATE:-1\r\n"


def test_fw_version_is_quoted():
    """AT+CIPFWVER? copies the version's quotes (esp-at-behavior.md 6.2)."""
    assert fmt.fw_version("v2.2.0.0") == b'+CIPFWVER:"v2.2.0.0"\r\n'
