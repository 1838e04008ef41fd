"""API tokens, looked up by what the plane stores of them (fleet.auth.stored_token_key), never in the clear."""

from rest_framework.authentication import TokenAuthentication

from fleet.auth import stored_token_key


class HashedTokenAuthentication(TokenAuthentication):
    """DRF's ``Authorization: Token <key>``, with the key hashed before the lookup."""

    def authenticate_credentials(self, key):
        return super().authenticate_credentials(stored_token_key(key))
