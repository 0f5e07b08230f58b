"""A session wrapper whose graph call fails once, for tests of how the scheduler survives a failing step."""


class FailsOnThirdCall:
    """Delegates to `session`, but its third `run` raises RuntimeError("device lost") (a device lost mid-batch)."""

    def __init__(self, session):
        self.session, self.calls = session, 0

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, *args):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("device lost")
        return self.session.run(*args)
