from sglang_taper.cli import main

raise SystemExit(main())
