"""voicerelay load generation and benchmarks (``make bench``), and the clients they drive (an
aiortc Realtime client, tone clients, headless Chromium).

May import: relay, transceiver, pipeline, deploy
"""

from pipeline.native_threads import pin_native_threads

pin_native_threads()  # before numpy is first imported: see pipeline/native_threads.py
