"""The HTTP routes, one module per concern, each an `APIRouter` of module-level handlers."""
