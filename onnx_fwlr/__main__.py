import sys

from onnx_fwlr.cli.main import main

sys.exit(main())
