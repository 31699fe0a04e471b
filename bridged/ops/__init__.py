"""Operations: the control socket (``bridged status`` and what comes later),
the recent-warnings ring each process keeps, and the status snapshot.

- `events`: a structlog processor keeping each process's last warnings;
- `protocol`: the control socket's framing, limits and where it lives;
- `server`: the front's asyncio server for it (peer check, bounds, dispatch);
- `status`: what ``status`` answers, gathered in the front.
"""
