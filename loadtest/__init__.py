"""voicerelay load tests, benchmarks and the local development stack launcher."""
