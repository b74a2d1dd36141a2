"""The Gemma 4 serving platform: Ray Serve graph, gRPC and OpenAI HTTP APIs, telemetry, CLI."""
