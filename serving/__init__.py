"""Ray Serve applications (vLLM behind an OpenAI-compatible endpoint): added with the serving issue."""
