"""Scenes for chat_app, chat_data, chat_knowledge and chat_flow (being written)."""
