import subprocess
import sys


def test_router_and_ensemble_stay_light() -> None:
    # Libraries of pure logic: importing them must not pull a web or model framework.
    code = (
        "import router, ensemble, sys;"
        "bad = {'fastapi', 'torch', 'transformers', 'vllm', 'uvicorn'} & set(sys.modules);"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
