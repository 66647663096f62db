import pytest

import routefx
from routefx.policies import Dense, policy_from_json


def test_dense_round_trips_through_json():
    p = Dense()
    s = p.to_json()
    assert policy_from_json(s) == p
    assert Dense.from_json(s) == p
    assert '"policy": "Dense"' in s and '"version": 1' in s


def test_unknown_fields_and_policies_are_refused():
    with pytest.raises(routefx.PolicyError, match=r"unknown field\(s\) 'budget' for policy Dense; its fields are: "
                                                  r"\(none\)"):
        Dense.from_dict({"budget": 0.5})
    with pytest.raises(routefx.PolicyError, match=r"unknown policy 'Sparse'; supported: .*Dense"):
        policy_from_json('{"policy": "Sparse"}')
    with pytest.raises(routefx.PolicyError, match="version 7 is not supported"):
        policy_from_json('{"policy": "Dense", "version": 7}')


def test_policies_are_frozen():
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        Dense().x = 1
