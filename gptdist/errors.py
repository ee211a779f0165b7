"""The one exception type that means "the user gave us something we cannot use".

Anything raised as a UserError is printed by the command line as a single line (no traceback) and ends the
process with exit status 2. The message must name the key, file or line at fault and say what would fix it.
"""


class UserError(Exception):
    """Bad input from the user: config values, paths, data files, checkpoints."""

    exit_code = 2


def env_int(env, name: str, default=None, minimum: int = 0) -> int:
    """An integer from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK...), or a UserError naming it."""
    text = env.get(name)
    if text is None or text == "":
        if default is None:
            raise UserError(f"{name} is not set: start gptdist train under a launcher (deepspeed, torchrun, srun) "
                            "or alone, with none of RANK/WORLD_SIZE set")
        return default
    value = str(text).strip()
    if not (value.lstrip("-").isdigit() and len(value) <= 9) or int(value) < minimum:
        raise UserError(f"{name}={str(text)[:40]!r} in the environment must be a whole number >= {minimum}; fix or "
                        "unset it (the launcher sets it)")
    return int(value)
