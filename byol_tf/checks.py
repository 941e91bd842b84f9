"""`check`: the one argument check behind every config's and schedule's errors, `... Received: name=value`.

A module of its own (importing nothing) so that `byol_tf.config` and the
audio and text configs it imports can all share it.
"""


def check(ok: bool, name: str, value, requirement: str) -> None:
    """Raises `ValueError("`name` requirement. Received: name=value")` unless `ok`."""
    if not ok:
        raise ValueError(f"`{name}` {requirement}. Received: {name}={value!r}")
