class ExpertFailed(Exception):
    """An expert could not produce its answer (it crashed, timed out, or its server went away).

    Unlike a problem with the request itself, another expert may still answer: strategies catch
    this to fall back or continue with the experts left.
    """
