from cpm_live.demo.pipeline import main

main()
