"""Media in and out of the prompt: decoding and preprocessing (images, audio, video) exact to the
reference processors, and prompt expansion into soft-token placeholders."""
