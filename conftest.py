import os
import sys

# tools/ and tests import the top-level `datasets/` folder, which is deliberately not installed.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
