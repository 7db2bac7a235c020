"""voicerelay load tests, benchmarks and the local development stack launcher."""

from pipeline.native_threads import pin_native_threads

pin_native_threads()  # before numpy is first imported: see pipeline/native_threads.py
