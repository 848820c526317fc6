#!/usr/bin/env python3
"""Talk to the voice agent: ``python run_agent.py --file question.wav --out answer.wav``,
``--mic``, or ``--serve``. ``--help`` lists every option."""

import sys

from realtime.cli import main

if __name__ == "__main__":
    sys.exit(main())
